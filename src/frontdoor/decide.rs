//! The timed decision every front door shares.
//!
//! A front door hands over a message and gets a [`Verdict`] back. Everything
//! that is the same for milter, SMTP and LMTP happens here, once: the
//! deadline (`server.decision_timeout`), the keepalive the protocol allows
//! while waiting, the `on_error` verdict when there is no plan, the
//! `mailtriage_decisions_failed_total{reason}` count and one log line with
//! the reason masked for personal data. The front door only translates the
//! verdict into its protocol.

use std::future::Future;
use std::time::Duration;

use tokio::time::{interval_at, sleep, Instant};

use super::{Filter, FilterError, MessageInput};
use crate::act::Plan;
use crate::record::metrics::name;
use crate::redact::redact;
use crate::settings::{Config, OnError};

/// How long a decision may take and what happens when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionSettings {
    /// Past this the message gets the `on_error` verdict.
    pub timeout: Duration,
    /// How often to tell the client we are alive while deciding (milter
    /// SMFIR_PROGRESS); unused by protocols that have no such thing.
    pub keepalive: Duration,
    pub on_error: OnError,
}

impl From<&Config> for DecisionSettings {
    fn from(c: &Config) -> Self {
        Self { timeout: c.server.decision_timeout, keepalive: c.server.progress_interval, on_error: c.server.on_error }
    }
}

/// What the front door does with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Apply the plan (possibly just the anti-spoofing removal, when the
    /// decision failed and `on_error = "accept"`) and deliver.
    Deliver(Plan),
    /// Accept the message and drop it: nobody is to receive it (recorded
    /// feedback mail).
    Discard,
    /// Ask the client to retry later (`on_error = "tempfail"`).
    Tempfail,
}

/// A way to tell the client "still working" while the decision runs.
pub trait KeepAlive {
    type Error;
    fn alive(&mut self) -> impl Future<Output = Result<(), Self::Error>>;
}

/// For protocols with no keepalive (SMTP, LMTP: the client waits for the
/// reply to the final dot, up to its own data timeout).
pub struct Silent;

impl KeepAlive for Silent {
    type Error = std::convert::Infallible;
    async fn alive(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Which front door asks, for the log line.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub front: &'static str,
    pub queue_id: Option<&'a str>,
}

/// Decides `input` under `settings`. Only a failing keepalive (the client
/// went away) is an error; every other failure becomes the `on_error`
/// verdict, counted and logged here.
pub async fn decide<F: Filter, K: KeepAlive>(
    filter: &F,
    input: MessageInput,
    settings: &DecisionSettings,
    caller: Caller<'_>,
    keepalive: &mut K,
) -> Result<Verdict, K::Error> {
    let header_names = input.header_names.clone();
    let outcome = {
        let fut = filter.filter(input);
        tokio::pin!(fut);
        let deadline = sleep(settings.timeout);
        tokio::pin!(deadline);
        let period = settings.keepalive.max(Duration::from_millis(100));
        let mut tick = interval_at(Instant::now() + period, period);
        loop {
            tokio::select! {
                r = &mut fut => break r.map_err(|e| (e.reason(), e.to_string(), matches!(e, FilterError::Retry(_)))),
                _ = &mut deadline => break Err(("timeout", format!("no decision within {:?}", settings.timeout), false)),
                _ = tick.tick() => keepalive.alive().await?,
            }
        }
    };
    Ok(match outcome {
        // Nothing to change in a message nobody will get.
        Ok(plan) if plan.discards() => Verdict::Discard,
        Ok(plan) => Verdict::Deliver(plan),
        Err((kind, reason, retry)) => {
            metrics::counter!(name::FAILED_OPEN, "reason" => kind, "front" => caller.front).increment(1);
            // Error text may quote message content: mask personal data before logging it.
            let reason = redact(&reason).into_owned();
            let (verdict, on_error, what) = match settings.on_error {
                _ if retry => {
                    (Verdict::Tempfail, "tempfail", "message cannot be handled now; asking the client to retry")
                }
                OnError::Accept => (
                    Verdict::Deliver(Plan::strip_inbound(&header_names)),
                    "accept",
                    "decision failed; delivering unrouted",
                ),
                OnError::Tempfail => (Verdict::Tempfail, "tempfail", "decision failed; asking the client to retry"),
            };
            let queue_id = caller.queue_id.unwrap_or("-");
            tracing::warn!(front = caller.front, queue_id, reason, on_error, "{what}");
            verdict
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::Change;

    struct Slow(Duration);
    impl Filter for Slow {
        async fn filter(&self, _msg: MessageInput) -> Result<Plan, FilterError> {
            tokio::time::sleep(self.0).await;
            Ok(Plan::default())
        }
    }

    struct Failing;
    impl Filter for Failing {
        async fn filter(&self, _msg: MessageInput) -> Result<Plan, FilterError> {
            Err(FilterError::Failed("mail from jane.doe@example.com broke it".into()))
        }
    }

    struct Unavailable;
    impl Filter for Unavailable {
        async fn filter(&self, _msg: MessageInput) -> Result<Plan, FilterError> {
            Err(FilterError::Retry("feedback store down".into()))
        }
    }

    struct Count(usize);
    impl KeepAlive for Count {
        type Error = ();
        async fn alive(&mut self) -> Result<(), ()> {
            self.0 += 1;
            Ok(())
        }
    }

    fn input() -> MessageInput {
        MessageInput { header_names: vec!["X-Triage-Department".into()], ..Default::default() }
    }

    fn settings(on_error: OnError) -> DecisionSettings {
        DecisionSettings { timeout: Duration::from_millis(3500), keepalive: Duration::from_secs(1), on_error }
    }

    const CALLER: Caller<'static> = Caller { front: "test", queue_id: None };

    #[tokio::test(start_paused = true)]
    async fn a_slow_decision_is_kept_alive_then_gets_the_on_error_verdict() {
        let mut ticks = Count(0);
        let v = decide(&Slow(Duration::from_secs(60)), input(), &settings(OnError::Accept), CALLER, &mut ticks).await;
        // Anti-spoofing removal still happens on the fail-open path.
        assert_eq!(
            v,
            Ok(Verdict::Deliver(Plan {
                changes: vec![Change::RemoveHeader { name: "X-Triage-Department".into(), index: 1 }]
            }))
        );
        assert_eq!(ticks.0, 3, "progress at 1, 2 and 3 s, then the 3.5 s deadline");
        let v =
            decide(&Slow(Duration::from_secs(60)), input(), &settings(OnError::Tempfail), CALLER, &mut Silent).await;
        assert_eq!(v, Ok(Verdict::Tempfail));
    }

    #[tokio::test]
    async fn an_error_gets_the_on_error_verdict_and_a_plan_passes_through() {
        assert_eq!(
            decide(&Failing, input(), &settings(OnError::Tempfail), CALLER, &mut Silent).await,
            Ok(Verdict::Tempfail)
        );
        let v = decide(&Slow(Duration::ZERO), input(), &settings(OnError::Tempfail), CALLER, &mut Silent).await;
        assert_eq!(v, Ok(Verdict::Deliver(Plan::default())));
    }

    #[tokio::test]
    async fn a_message_that_must_wait_is_tempfailed_even_when_errors_accept() {
        let v = decide(&Unavailable, input(), &settings(OnError::Accept), CALLER, &mut Silent).await;
        assert_eq!(v, Ok(Verdict::Tempfail));
    }
}
