//! Outgoing mail: SMTP through lettre when configured, otherwise an outbox folder (dev mode)
//! (`<data>/outbox`, owner only) whose files hold the whole message; the log names the file,
//! never the links.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// How long one delivery may take before it counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("invalid mail settings: {0}")]
    Config(String),
    #[error("cannot build message: {0}")]
    Message(String),
    #[error("delivery failed: {0}")]
    Send(String),
}

pub enum Mailer {
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
    },
    Outbox {
        dir: PathBuf,
        from: Mailbox,
    },
}

impl Mailer {
    /// SMTP when `smtp_url` is set (`smtp://[user:pass@]host[:port][?tls=required]` or
    /// `smtps://…`), else the outbox folder `dir`.
    pub fn new(smtp_url: Option<&str>, from: &str, dir: PathBuf) -> Result<Self, MailError> {
        let from: Mailbox = from
            .parse()
            .map_err(|e| MailError::Config(format!("sender {from:?}: {e}")))?;
        match smtp_url {
            Some(url) => {
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| MailError::Config(format!("SMTP URL: {e}")))?
                    .timeout(Some(SEND_TIMEOUT))
                    .build();
                Ok(Mailer::Smtp { transport, from })
            }
            None => Ok(Mailer::Outbox { dir, from }),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Mailer::Smtp { .. } => "smtp".into(),
            Mailer::Outbox { dir, .. } => format!("outbox {}", dir.display()),
        }
    }

    /// Sends one plain-text mail.
    pub async fn send(&self, to: &str, subject: &str, body: &str) -> Result<(), MailError> {
        let from = match self {
            Mailer::Smtp { from, .. } | Mailer::Outbox { from, .. } => from.clone(),
        };
        let to_box = Mailbox::new(
            None,
            to.parse::<lettre::Address>()
                .map_err(|e| MailError::Message(format!("recipient {to:?}: {e}")))?,
        );
        let msg = Message::builder()
            .from(from)
            .to(to_box)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_string())
            .map_err(|e| MailError::Message(e.to_string()))?;
        match self {
            Mailer::Smtp { transport, .. } => {
                tokio::time::timeout(SEND_TIMEOUT, transport.send(msg))
                    .await
                    .map_err(|_| MailError::Send("timed out".into()))?
                    .map_err(|e| MailError::Send(e.to_string()))?;
                Ok(())
            }
            Mailer::Outbox { dir, .. } => {
                let dir_err =
                    |e: std::io::Error| MailError::Send(format!("{}: {e}", dir.display()));
                tokio::fs::create_dir_all(dir).await.map_err(dir_err)?;
                // The messages hold activation and password-reset links: owner only.
                tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .await
                    .map_err(dir_err)?;
                let name = format!(
                    "{}-{}.eml",
                    chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
                    super::secrets::random_hex(4)
                );
                let path = dir.join(name);
                let bytes = msg.formatted();
                let path2 = path.clone();
                tokio::task::spawn_blocking(move || crate::fsutil::write_private(&path2, &bytes))
                    .await
                    .map_err(|e| MailError::Send(e.to_string()))?
                    .map_err(|e| MailError::Send(format!("{}: {e}", path.display())))?;
                // Not the body: its links are credentials, and logs travel further than files.
                tracing::info!(to, subject, file = %path.display(), "mail written to the outbox (no SMTP configured): its link is in that file");
                Ok(())
            }
        }
    }
}
