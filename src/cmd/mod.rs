//! What the subcommands other than `serve` and `check-config` do: the
//! offline tools (`classify`, `train`, `eval`, `replay`, `model fetch`) and
//! the continuous-learning ones (`feedback`, `retrain`, `heads`, `report`),
//! erasure (`forget`), and the admin's (`config show`, `generate` for
//! packagers).

pub mod forget;
pub mod generate;
pub mod learn;
pub mod offline;

use std::io::{Read, Write};
use std::time::Duration;

/// sysexits.h: "temporary failure; the user is invited to retry" (the
/// feedback store is down). Scripts and Dovecot's pipe treat it so.
pub const EX_TEMPFAIL: u8 = 75;

/// `POST`s a JSON body to the running daemon's HTTP side with the bearer
/// token; returns the status code and the body.
pub fn post_to_daemon(
    listen: &str,
    token: &str,
    path: &str,
    body: &serde_json::Value,
) -> std::io::Result<(u16, String)> {
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(listen)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {listen}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}
