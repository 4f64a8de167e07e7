//! Resource identifiers: a type prefix plus 25 base36 characters of a random 128-bit number.

use rand::RngCore;

/// Prefixes of every id the platform hands out.
pub mod prefix {
    pub const CAPSULE: &str = "cl-";
    pub const USER: &str = "usr-";
    pub const TEAM: &str = "team-";
    pub const API_KEY: &str = "key-";
    pub const HOST: &str = "host-";
    pub const SNAPSHOT: &str = "snap-";
    pub const SESSION: &str = "ses-";
    pub const BUILD: &str = "bld-";
}

/// The platform team: owns built templates and the capsules builds run in; nobody is a
/// member.
pub const PLATFORM_TEAM_ID: &str = "team-0000000000000000000000000";

/// Number of base36 digits needed for any 128-bit number (36^25 > 2^128).
const ID_DIGITS: usize = 25;

/// A fresh random id with the given prefix.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", base36(u128::from_be_bytes(bytes)))
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; ID_DIGITS];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    // The digits are ASCII by construction.
    out.iter().map(|&b| b as char).collect()
}

/// True when `id` has the given prefix followed by exactly 25 base36 characters.
pub fn is_valid(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == ID_DIGITS
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_25_base36_digits() {
        for _ in 0..100 {
            let id = new_id(prefix::CAPSULE);
            assert!(is_valid(prefix::CAPSULE, &id), "{id}");
        }
        assert_ne!(new_id("x-"), new_id("x-"));
    }

    #[test]
    fn base36_of_extremes() {
        assert_eq!(base36(0), "0".repeat(25));
        assert_eq!(base36(u128::MAX), "f5lxx1zz5pnorynqglhzmsp33");
        assert!(!is_valid("cl-", "cl-abc"));
        assert!(!is_valid("cl-", "usr-0000000000000000000000000"));
        assert!(!is_valid("cl-", "cl-000000000000000000000000Z"));
    }
}
