//! The one polling loop every bounded wait in the tests goes through.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// First pause between two checks; it doubles after every miss up to [`MAX_INTERVAL`], so quick conditions are seen
/// quickly and slow ones (a container starting) are not hammered.
const FIRST_INTERVAL: Duration = Duration::from_millis(10);
const MAX_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `check` until it returns `Some` (returned) or `timeout` has passed (`None`). `check` runs at least once, and
/// once more at the deadline.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut interval = FIRST_INTERVAL;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(MAX_INTERVAL);
    }
}

/// Like [`poll`], but panics with `waited <timeout> for <what>` when the time is up. When the failure message needs
/// state read at that moment (a log tail, the last thing seen), use [`poll`] and panic with it yourself.
pub fn eventually<T>(timeout: Duration, what: impl Display, check: impl FnMut() -> Option<T>) -> T {
    poll(timeout, check).unwrap_or_else(|| panic!("waited {timeout:?} for {what}"))
}
