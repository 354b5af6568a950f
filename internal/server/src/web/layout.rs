//! The page shell and the small pieces pages share. maud escapes every value put into markup, so a hostname, label
//! or restic message is always shown as text.

use maud::{DOCTYPE, Markup, html};

use super::HTMX_PATH;
use super::session::WebUser;

/// Which page of the navigation is open.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Fleet,
    AddHosts,
    Repositories,
    Plans,
    Assets,
    Audit,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            // htmx would otherwise add an inline <style>, which the page's Content-Security-Policy refuses.
            meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false}"#;
            title { (title) " · restic-manager" }
            link rel="stylesheet" href="/ui/static/style.css";
            script src=(HTMX_PATH) defer {}
            script src="/ui/static/app.js" defer {}
        }
    }
}

/// A page for a signed-in operator: navigation, sign-out, then `body`.
pub(crate) fn page(title: &str, nav: Nav, user: &WebUser, body: Markup) -> Markup {
    let item = |which: Nav, href: &str, label: &str| {
        html! { a href=(href) aria-current=[(which == nav).then_some("page")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top {
                    a.brand href="/" { "restic-manager" }
                    nav {
                        (item(Nav::Fleet, "/", "Fleet"))
                        (item(Nav::AddHosts, "/ui/hosts/add", "Add hosts"))
                        (item(Nav::Repositories, "/ui/repositories", "Repositories"))
                        (item(Nav::Plans, "/ui/plans", "Plans"))
                        (item(Nav::Assets, "/ui/assets", "Assets"))
                        (item(Nav::Audit, "/ui/audit", "Audit"))
                    }
                    form.signout method="post" action="/ui/logout" {
                        (csrf_field(user))
                        button type="submit" { "Sign out" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A page without navigation (sign-in, errors).
pub(crate) fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top { a.brand href="/" { "restic-manager" } }
                main { (body) }
            }
        }
    }
}

/// The hidden field every state-changing form of the session carries.
pub(crate) fn csrf_field(user: &WebUser) -> Markup {
    html! { input type="hidden" name="csrf" value=(user.session.csrf); }
}

/// "12 s ago", "3 min ago", "5 h ago", "2 d ago"; "in the future" for clocks that disagree.
pub(crate) fn ago(seconds: i64) -> String {
    match seconds {
        s if s < 0 => "just now".into(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times() {
        assert_eq!(ago(-5), "just now");
        assert_eq!(ago(0), "0 s ago");
        assert_eq!(ago(59), "59 s ago");
        assert_eq!(ago(60), "1 min ago");
        assert_eq!(ago(7200), "2 h ago");
        assert_eq!(ago(86_400 * 3), "3 d ago");
    }
}
