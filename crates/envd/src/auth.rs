//! The capsule's token: with one set, every connection must present it first
//! (`Request::Auth`), so reaching envd's address is not enough to command the guest.
//!
//! A cold-booted guest gets its token on the kernel command line (`WRENN_ENVD_TOKEN`, read once
//! at start and removed from envd's environment); a restored one keeps the token it was saved
//! with (none for a template's snapshot) until the host's `Restored` request, itself
//! authenticated with that token, hands it the capsule's own.

use std::sync::Mutex;

static TOKEN: Mutex<Option<String>> = Mutex::new(None);

/// Takes the boot-time token from the environment. Call before any thread starts (it changes
/// the process environment).
pub fn init_from_env() {
    if let Ok(t) = std::env::var(envd_proto::TOKEN_ENV) {
        // Before any other thread starts: nothing reads the environment concurrently, and
        // processes envd starts never see the token.
        std::env::remove_var(envd_proto::TOKEN_ENV);
        if !t.is_empty() {
            set(t);
        }
    }
}

/// From now on connections must present `token`.
pub fn set(token: String) {
    *TOKEN.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
}

/// Whether a connection that presented `given` (or nothing) may go on.
pub fn admits(given: Option<&str>) -> bool {
    match TOKEN.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        None => true,
        Some(want) => given.is_some_and(|g| same(g.as_bytes(), want.as_bytes())),
    }
}

/// Compares in time that depends only on the lengths (no early exit on the first difference).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }
}
