//! "Repositories": the restic repositories defined on the server, with their health, the plans that use each one and
//! their maintenance policies; create, edit and delete through the API's own functions
//! ([`crate::routes::repositories`]), so checks and audit events are the API's.
//!
//! Secrets are write-only: the password and environment values never reach the page, not even after a refused form.
//! On edit an empty password keeps the stored one, and an environment line with only a name keeps that variable's
//! stored value (the names are listed; removing a line removes the variable).

use std::collections::BTreeMap;

use axum::Form;
use axum::extract::rejection::{FormRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{HeaderMap, StatusCode};
use maud::{Markup, html};
use rm_protocol::admin::{CreateRepository, RepositoryView, UpdateRepository};
use rm_protocol::backup::{Health, PlanView};
use serde::Deserialize;

use super::layout::{self, Nav};
use super::session::WebUser;
use super::{PageError, forms};
use crate::auth::Peer;
use crate::routes::repositories as api;
use crate::{ApiError, AppState};

/// The create and edit form, as the browser sends it. No `Debug`: it carries the password and environment values.
#[derive(Default, Deserialize)]
pub(crate) struct RepositoryForm {
    #[serde(default)]
    csrf: String,
    /// Create only (the edit page takes the name from the path).
    #[serde(default)]
    name: String,
    #[serde(default)]
    url: String,
    /// Edit: empty keeps the stored password.
    #[serde(default)]
    password: String,
    /// `NAME=value` a line; on edit a line with only `NAME` keeps the stored value.
    #[serde(default)]
    env: String,
    /// PEM; on edit empty keeps the stored certificate.
    #[serde(default)]
    ca_cert: String,
    #[serde(default)]
    remove_ca_cert: Option<String>,
    #[serde(default)]
    auto_init: Option<String>,
    #[serde(default)]
    min_restic_version: String,
}

/// One line of the environment field.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EnvLine {
    Set(String),
    /// Only the name: keep the stored value.
    Keep,
}

fn parse_env(text: &str) -> Result<BTreeMap<String, EnvLine>, String> {
    let mut env = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (name, value) = match line.split_once('=') {
            Some((name, value)) => (name.trim(), EnvLine::Set(value.to_owned())),
            None => (line.trim(), EnvLine::Keep),
        };
        if env.insert(name.to_owned(), value).is_some() {
            return Err(format!("env {:?} is given twice", name.chars().take(64).collect::<String>()));
        }
    }
    Ok(env)
}

/// The names of the environment field, without values (what a refused form shows again).
fn env_names(text: &str) -> String {
    let names = text.lines().filter_map(|l| Some(l.split('=').next()?.trim()).filter(|n| !n.is_empty()));
    names.collect::<Vec<_>>().join("\n")
}

impl RepositoryForm {
    /// The API's create body; the checks are the API's (`NewRepository::validate`).
    fn create(&self) -> Result<CreateRepository, String> {
        let mut env = BTreeMap::new();
        for (name, line) in parse_env(&self.env)? {
            match line {
                EnvLine::Set(value) => env.insert(name, value),
                EnvLine::Keep => return Err(format!("env {name}: give a value, as {name}=value")),
            };
        }
        Ok(CreateRepository {
            name: self.name.trim().to_owned(),
            url: self.url.trim().to_owned(),
            password: self.password.clone(),
            env,
            ca_cert: forms::optional(&self.ca_cert),
            auto_init: forms::ticked(&self.auto_init),
            min_restic_version: forms::optional(&self.min_restic_version),
            prune: None,
            check: None,
        })
    }

    /// The API's update body: only what differs from `current`. `stored_env` opens the stored environment values, and
    /// is called only when a kept variable must be written again (the environment is replaced whole).
    fn changes(
        &self,
        current: &RepositoryView,
        stored_env: impl FnOnce() -> Result<BTreeMap<String, String>, String>,
    ) -> Result<UpdateRepository, String> {
        let url = self.url.trim();
        let env = parse_env(&self.env)?;
        let same_names = env.keys().eq(current.env_names.iter());
        let env = if same_names && env.values().all(|l| *l == EnvLine::Keep) {
            None
        } else {
            let mut open = Some(stored_env);
            let mut stored: Option<BTreeMap<String, String>> = None;
            let mut new = BTreeMap::new();
            for (name, line) in env {
                let value = match line {
                    EnvLine::Set(value) => value,
                    EnvLine::Keep if !current.env_names.contains(&name) => {
                        return Err(format!("env {name}: it is not set now; give a value, as {name}=value"));
                    }
                    EnvLine::Keep => {
                        if let Some(open) = open.take() {
                            stored = Some(open()?);
                        }
                        stored.as_ref().and_then(|s| s.get(&name).cloned()).unwrap_or_default()
                    }
                };
                new.insert(name, value);
            }
            Some(new)
        };
        let ca_cert = if forms::ticked(&self.remove_ca_cert) {
            current.ca_cert_set.then_some(None)
        } else {
            forms::optional(&self.ca_cert).map(Some)
        };
        let min = forms::optional(&self.min_restic_version);
        let auto_init = forms::ticked(&self.auto_init);
        Ok(UpdateRepository {
            url: (url != current.url).then(|| url.to_owned()),
            password: Some(self.password.clone()).filter(|p| !p.is_empty()),
            env,
            ca_cert,
            auto_init: (auto_init != current.auto_init).then_some(auto_init),
            min_restic_version: (min != current.min_restic_version).then_some(min),
            prune: None,
            check: None,
        })
    }

    /// The form as the edit page first shows it: no secret, the environment's names only.
    fn of(view: &RepositoryView) -> RepositoryForm {
        RepositoryForm {
            name: view.name.clone(),
            url: view.url.clone(),
            env: view.env_names.join("\n"),
            auto_init: view.auto_init.then(String::new),
            min_restic_version: view.min_restic_version.clone().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// Whether [`RepositoryForm::changes`] will need the stored environment values: the environment changes and
    /// keeps a variable that is set now.
    fn needs_stored_env(&self, current: &RepositoryView) -> bool {
        let Ok(env) = parse_env(&self.env) else { return false };
        let unchanged = env.keys().eq(current.env_names.iter()) && env.values().all(|l| *l == EnvLine::Keep);
        !unchanged && env.iter().any(|(name, line)| *line == EnvLine::Keep && current.env_names.contains(name))
    }

    /// What a refused form shows again: what the operator typed, without the secrets.
    fn without_secrets(self) -> RepositoryForm {
        RepositoryForm { password: String::new(), env: env_names(&self.env), ..self }
    }
}

async fn views(state: &AppState) -> Result<(Vec<RepositoryView>, Vec<PlanView>), PageError> {
    let repositories = api::list_repositories(state).await?;
    let plans = state.fleet().call(crate::routes::plans::plan_views).await?;
    Ok((repositories, plans))
}

/// `GET /ui/repositories`
pub(crate) async fn list(user: WebUser, State(state): State<AppState>) -> Result<Response, PageError> {
    list_page(&user, &state, StatusCode::OK, &RepositoryForm::default(), None).await
}

async fn list_page(
    user: &WebUser,
    state: &AppState,
    status: StatusCode,
    form: &RepositoryForm,
    error: Option<&str>,
) -> Result<Response, PageError> {
    let (repositories, plans) = views(state).await?;
    let body = html! {
        h1 { "Repositories" }
        @if repositories.is_empty() {
            p.empty { "No repositories yet. Define one below; plans then back up into it." }
        } @else {
            table.repositories {
                thead { tr {
                    th { "Name" } th { "URL" } th { "Health" } th { "Initialise" } th { "Plans" } th { "Prune" }
                    th { "Check" } th { "Secrets" }
                } }
                tbody { @for r in &repositories { (row(r, &plans)) } }
            }
        }
        h2 #create { "New repository" }
        (repository_form(user, form, None, error))
    };
    Ok((status, layout::page("Repositories", Nav::Repositories, user, body)).into_response())
}

fn row(r: &RepositoryView, plans: &[PlanView]) -> Markup {
    let health = r.maintenance.as_ref().map_or(Health::Never, |m| m.health);
    let using: Vec<&str> = plans.iter().filter(|p| p.repository == r.name).map(|p| p.name.as_str()).collect();
    html! {
        tr data-repository=(r.name) {
            td.name { a href={ "/ui/repositories/" (r.name) } { (r.name) } }
            td.url { code { (r.url) } }
            td { span class={ "health " (health.as_str()) } { (health.as_str()) } }
            td { (if r.auto_init { "automatic" } else { "no" }) }
            td.plans {
                @if using.is_empty() { span.none { "none" } }
                @for (i, p) in using.iter().enumerate() { @if i > 0 { ", " } a href={ "/ui/plans/" (p) } { (p) } }
            }
            td.prune {
                @match &r.prune {
                    Some(p) => { code { (p.schedule) } @if let Some(m) = &p.max_unused { " " small { "max unused " (m) } } },
                    None => span.none { "none" },
                }
            }
            td.check {
                @match &r.check {
                    Some(c) => { code { (c.schedule) } @if let Some(s) = &c.read_data_subset { " " small { "read " (s) } } },
                    None => span.none { "none" },
                }
            }
            td.secrets {
                "password set"
                @if !r.env_names.is_empty() { br; small { "env: " (r.env_names.join(", ")) } }
                @if r.ca_cert_set { br; small { "CA certificate" } }
            }
        }
    }
}

/// The create form (`current: None`) or the edit form of `current`. Never puts a secret into the page.
fn repository_form(
    user: &WebUser,
    form: &RepositoryForm,
    current: Option<&RepositoryView>,
    error: Option<&str>,
) -> Markup {
    let action = match current {
        Some(r) => format!("/ui/repositories/{}", r.name),
        None => "/ui/repositories".to_owned(),
    };
    html! {
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form.edit.repository method="post" action=(action) {
            (layout::csrf_field(user))
            @if current.is_none() {
                label { "Name" input type="text" name="name" value=(form.name) required placeholder="main"; }
            }
            label { "URL" input type="text" name="url" value=(form.url) required placeholder="/srv/restic or s3:host/bucket"; }
            @match current {
                Some(_) => label { "Password" input type="password" name="password" autocomplete="new-password"
                    placeholder="unchanged"; small { "Empty: keep the stored password." } },
                None => label { "Password" input type="password" name="password" autocomplete="new-password" required; },
            }
            label.wide { "Environment (secret values)"
                textarea name="env" rows="3" placeholder="AWS_ACCESS_KEY_ID=…" { (form.env) }
                small {
                    "One NAME=value a line. Values are never shown again"
                    @if current.is_some() { "; a line with only the name keeps its stored value, and removing a line removes the variable" }
                    "."
                }
            }
            label.wide { "CA certificate (PEM)"
                textarea name="ca_cert" rows="2" placeholder="-----BEGIN CERTIFICATE-----" { (form.ca_cert) }
                @if let Some(r) = current {
                    small { (if r.ca_cert_set { "A certificate is set; empty keeps it." } else { "None set." }) }
                }
            }
            @if current.is_some_and(|r| r.ca_cert_set) {
                label.check { input type="checkbox" name="remove_ca_cert" value="1"
                    checked[forms::ticked(&form.remove_ca_cert)]; "Remove the CA certificate" }
            }
            label { "Oldest restic" input type="text" name="min_restic_version" value=(form.min_restic_version)
                placeholder="any (e.g. 0.16.0)"; }
            label.check { input type="checkbox" name="auto_init" value="1" checked[forms::ticked(&form.auto_init)];
                "Initialise automatically when missing" }
            button type="submit" { (if current.is_some() { "Save" } else { "Create repository" }) }
        }
    }
}

/// `POST /ui/repositories`
pub(crate) async fn create(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    form: Result<Form<RepositoryForm>, FormRejection>,
) -> Result<Response, PageError> {
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let outcome = match form.create() {
        Ok(body) => api::create_repository(&state, peer, &headers, body).await.map_err(forms::fixable),
        Err(message) => Err(Ok((StatusCode::BAD_REQUEST, message))),
    };
    match outcome {
        Ok(_) => Ok(Redirect::to("/ui/repositories").into_response()),
        Err(Ok((status, message))) => list_page(&user, &state, status, &form.without_secrets(), Some(&message)).await,
        Err(Err(page)) => Err(page),
    }
}

async fn current(state: &AppState, name: &str) -> Result<RepositoryView, PageError> {
    let all = api::list_repositories(state).await?;
    let found = all.into_iter().find(|r| r.name == name);
    Ok(found.ok_or_else(|| ApiError::NotFound(format!("repository {name:?}")))?)
}

/// `GET /ui/repositories/{name}`
pub(crate) async fn edit(
    user: WebUser,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, PageError> {
    let name = api::name_param(path)?;
    let view = current(&state, &name).await?;
    edit_page(&user, &state, StatusCode::OK, &view, &RepositoryForm::of(&view), None).await
}

async fn edit_page(
    user: &WebUser,
    state: &AppState,
    status: StatusCode,
    view: &RepositoryView,
    form: &RepositoryForm,
    error: Option<&str>,
) -> Result<Response, PageError> {
    let plans = state.fleet().call(crate::routes::plans::plan_views).await?;
    let using: Vec<&PlanView> = plans.iter().filter(|p| p.repository == view.name).collect();
    let title = format!("Repository {}", view.name);
    let body = html! {
        p.back { a href="/ui/repositories" { "← Repositories" } }
        h1 { "Repository " code { (view.name) } }
        (repository_form(user, form, Some(view), error))
        h2 { "Delete" }
        @if using.is_empty() {
            p.hint { "No plan uses this repository. Deleting it does not touch the data in it." }
        } @else {
            p.hint { "Used by " @for (i, p) in using.iter().enumerate() { @if i > 0 { ", " } a href={ "/ui/plans/" (p.name) } { (p.name) } }
                ": it cannot be deleted while plans use it." }
        }
        form.delete method="post" action={ "/ui/repositories/" (view.name) "/delete" } {
            (layout::csrf_field(user))
            button.danger type="submit" { "Delete repository" }
        }
    };
    Ok((status, layout::page(&title, Nav::Repositories, user, body)).into_response())
}

/// `POST /ui/repositories/{name}`
pub(crate) async fn update(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<RepositoryForm>, FormRejection>,
) -> Result<Response, PageError> {
    let name = api::name_param(path)?;
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    let view = current(&state, &name).await?;
    let stored = if form.needs_stored_env(&view) { Some(stored_env(&state, &name).await) } else { None };
    let outcome =
        match form.changes(&view, || stored.unwrap_or_else(|| Err("env: the stored values were not read".into()))) {
            Ok(changes) if changes == UpdateRepository::default() => Ok(()),
            Ok(changes) => {
                api::update_repository(&state, peer, &headers, name, changes).await.map(drop).map_err(forms::fixable)
            }
            Err(message) => Err(Ok((StatusCode::BAD_REQUEST, message))),
        };
    match outcome {
        Ok(()) => Ok(Redirect::to("/ui/repositories").into_response()),
        Err(Ok((status, message))) => {
            edit_page(&user, &state, status, &view, &form.without_secrets(), Some(&message)).await
        }
        Err(Err(page)) => Err(page),
    }
}

/// The stored environment values of a repository (to write kept variables again), or why they cannot be read.
async fn stored_env(state: &AppState, name: &str) -> Result<BTreeMap<String, String>, String> {
    let key = state.secret_key().clone();
    let lookup = name.to_owned();
    let opened = state.fleet().call(move |c| rm_fleet::repository_secrets(c, &key, &lookup)).await;
    match opened {
        Ok(Some(Ok(secrets))) => Ok(secrets.env),
        Ok(None) => Err(format!("repository {name:?} was not found")),
        Ok(Some(Err(e))) => Err(format!("env: the stored values do not open ({e}); give every value again")),
        Err(e) => Err(format!("env: the stored values could not be read: {e}")),
    }
}

#[derive(Deserialize)]
pub(crate) struct DeleteForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /ui/repositories/{name}/delete`: refused while plans use the repository.
pub(crate) async fn delete(
    user: WebUser,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    form: Result<Form<DeleteForm>, FormRejection>,
) -> Result<Response, PageError> {
    let name = api::name_param(path)?;
    let Form(form) = form.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    user.check_form(&form.csrf, &headers, &state)?;
    match api::delete_repository(&state, peer, &headers, &name).await.map_err(forms::fixable) {
        Ok(()) => Ok(Redirect::to("/ui/repositories").into_response()),
        Err(Ok((status, message))) => {
            let view = current(&state, &name).await?;
            edit_page(&user, &state, status, &view, &RepositoryForm::of(&view), Some(&message)).await
        }
        Err(Err(page)) => Err(page),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(env: &[&str]) -> RepositoryView {
        RepositoryView {
            name: "main".into(),
            url: "/srv/restic".into(),
            password_set: true,
            env_names: env.iter().map(|s| s.to_string()).collect(),
            ca_cert_set: false,
            auto_init: false,
            min_restic_version: None,
            created: String::new(),
            updated: String::new(),
            prune: None,
            check: None,
            maintenance: None,
        }
    }

    fn form(url: &str, password: &str, env: &str) -> RepositoryForm {
        RepositoryForm {
            name: " main ".into(),
            url: url.into(),
            password: password.into(),
            env: env.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_environment_is_one_name_a_line() {
        let env = parse_env("A=1\r\n\nB= two=2 \nC\n").unwrap();
        assert_eq!(env["A"], EnvLine::Set("1".into()));
        assert_eq!(env["B"], EnvLine::Set(" two=2 ".into()));
        assert_eq!(env["C"], EnvLine::Keep);
        assert!(parse_env("A=1\nA=2").unwrap_err().contains("twice"));
        assert_eq!(env_names("A=secret\nB\n\n=x\n"), "A\nB");
    }

    #[test]
    fn create_needs_every_value() {
        let body = form("/srv/restic", "pw", "AWS_ACCESS_KEY_ID=k").create().unwrap();
        assert_eq!(body.name, "main");
        assert_eq!(body.env["AWS_ACCESS_KEY_ID"], "k");
        assert_eq!((body.ca_cert, body.auto_init, body.min_restic_version), (None, false, None));
        assert!(form("/srv", "pw", "AWS_ACCESS_KEY_ID").create().unwrap_err().contains("give a value"));
    }

    #[test]
    fn an_unchanged_edit_changes_nothing_and_an_empty_password_keeps_it() {
        let current = view(&["A", "B"]);
        let never = || -> Result<BTreeMap<String, String>, String> { panic!("the stored values were not needed") };
        let same = form("/srv/restic", "", "A\nB").changes(&current, never).unwrap();
        assert_eq!(same, UpdateRepository::default());
        let moved = form("/srv/other", "new-pw", "B\nA").changes(&current, never).unwrap();
        assert_eq!(moved.url.as_deref(), Some("/srv/other"));
        assert_eq!(moved.password.as_deref(), Some("new-pw"));
        assert_eq!(moved.env, None);
    }

    #[test]
    fn kept_variables_are_written_again_with_their_stored_values() {
        let current = view(&["A", "B"]);
        let stored = || Ok(BTreeMap::from([("A".to_string(), "a".to_string()), ("B".to_string(), "b".to_string())]));
        let edit = form("/srv/restic", "", "A\nC=c");
        assert!(edit.needs_stored_env(&current));
        assert!(!form("/srv/restic", "", "B\nA").needs_stored_env(&current));
        assert!(!form("/srv/restic", "", "A=new").needs_stored_env(&current));
        let changes = edit.changes(&current, stored).unwrap();
        let env = changes.env.unwrap();
        assert_eq!(env.len(), 2, "B was removed");
        assert_eq!((env["A"].as_str(), env["C"].as_str()), ("a", "c"));
        let cleared = form("/srv/restic", "", "").changes(&current, stored).unwrap();
        assert_eq!(cleared.env, Some(BTreeMap::new()));
        let unknown = form("/srv/restic", "", "D").changes(&current, stored).unwrap_err();
        assert!(unknown.contains("not set now"), "{unknown}");
    }

    #[test]
    fn a_refused_form_forgets_the_secrets() {
        let shown = form("/srv", "hunter2", "A=secret-value\nB").without_secrets();
        assert_eq!((shown.password.as_str(), shown.env.as_str(), shown.url.as_str()), ("", "A\nB", "/srv"));
    }
}
