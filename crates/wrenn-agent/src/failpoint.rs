//! Crash points for the crash tests: with `WRENN_FAILPOINT=<name>` in its environment, the
//! process aborts (as a `kill -9` would end it, nothing flushed) when it reaches the point of
//! that name. Unset, a point costs one comparison. Points: `snapshot-after-switch` (a live
//! snapshot's VM has just moved onto its new overlay; its state is not saved yet).

use std::sync::OnceLock;

pub fn hit(name: &str) {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    if POINT
        .get_or_init(|| std::env::var("WRENN_FAILPOINT").ok())
        .as_deref()
        == Some(name)
    {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
