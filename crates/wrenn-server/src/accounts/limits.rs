//! Rate limits on the unauthenticated account endpoints (login, signup, activation, reset),
//! per client IP and per email address.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Which endpoint family a request counts against: each has its own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Login,
    Signup,
    Activate,
    Reset,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Login => "login",
            Action::Signup => "signup",
            Action::Activate => "activate",
            Action::Reset => "reset",
        }
    }
}

pub struct AuthLimits {
    per_ip: DefaultKeyedRateLimiter<String>,
    per_email: DefaultKeyedRateLimiter<String>,
}

/// Which budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Ip,
    Email,
}

impl AuthLimits {
    /// `ip_per_min` and `email_per_min` requests per minute (and as a burst) for each action.
    pub fn new(ip_per_min: u32, email_per_min: u32) -> Self {
        let q = |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_ip: RateLimiter::keyed(q(ip_per_min)),
            per_email: RateLimiter::keyed(q(email_per_min)),
        }
    }

    /// Counts one attempt; `Err` names the budget that is spent.
    pub fn check(
        &self,
        action: Action,
        ip: Option<IpAddr>,
        email: Option<&str>,
    ) -> Result<(), Exhausted> {
        if let Some(ip) = ip {
            if self
                .per_ip
                .check_key(&format!("{}:{ip}", action.as_str()))
                .is_err()
            {
                return Err(Exhausted::Ip);
            }
        }
        if let Some(email) = email {
            if self
                .per_email
                .check_key(&format!("{}:{email}", action.as_str()))
                .is_err()
            {
                return Err(Exhausted::Email);
            }
        }
        Ok(())
    }

    /// Forgets keys whose budget is full again (bounded memory).
    pub fn prune(&self) {
        self.per_ip.retain_recent();
        self.per_email.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ip_email_and_action_has_its_own_budget() {
        let l = AuthLimits::new(3, 2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.check(Action::Login, Some(ip), Some("a@x")).is_ok());
        assert!(l.check(Action::Login, Some(ip), Some("a@x")).is_ok());
        assert_eq!(
            l.check(Action::Login, Some(ip), Some("a@x")),
            Err(Exhausted::Email)
        );
        // The per-IP budget counted all three attempts.
        assert_eq!(
            l.check(Action::Login, Some(ip), Some("b@x")),
            Err(Exhausted::Ip)
        );
        assert!(l.check(Action::Login, Some(other), Some("b@x")).is_ok());
        assert!(l.check(Action::Signup, Some(ip), Some("a@x")).is_ok());
    }
}
