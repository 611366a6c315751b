//! The bounded queue in front of the encoder.
//!
//! Inference is CPU-heavy and must never run on the async workers that serve
//! MTA connections. Messages wait in one bounded queue; dedicated threads
//! take them one at a time (one sequence per pass: no padding). Each waiter
//! has a deadline. A full queue or a passed deadline is an error the caller
//! turns into fail-open, never an unbounded wait.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};
use tokio::sync::oneshot;

use super::ModelError;

/// Anything that turns text into an embedding (the encoder, or a test double).
pub type EmbedFn = Arc<dyn Fn(&str) -> Result<Vec<f32>, ModelError> + Send + Sync>;

/// What the queue tells whoever started it as it works: the model records
/// nothing itself (the pipeline turns these into metrics).
pub trait QueueObserver: Send + Sync {
    /// Messages waiting now.
    fn depth(&self, waiting: usize);
    /// How long a message waited for a worker.
    fn waited(&self, seconds: f64);
    /// How long one inference took.
    fn inferred(&self, seconds: f64);
}

struct Job {
    text: String,
    queued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<f32>, ModelError>>,
}

pub struct Batcher {
    tx: Sender<Job>,
    depth: usize,
    deadline: Duration,
    observer: Arc<dyn QueueObserver>,
}

impl Batcher {
    /// Starts `workers` inference threads behind a queue of `depth` messages.
    pub fn start(
        embed: EmbedFn,
        workers: usize,
        depth: usize,
        deadline: Duration,
        observer: Arc<dyn QueueObserver>,
    ) -> Batcher {
        let (tx, rx) = bounded::<Job>(depth);
        // Recent inference time (µs, moving average), shared by the workers.
        let recent = Arc::new(AtomicU64::new(0));
        for n in 0..workers.max(1) {
            let (rx, embed, recent, observer) = (rx.clone(), embed.clone(), recent.clone(), observer.clone());
            std::thread::Builder::new()
                .name(format!("mt-infer-{n}"))
                .spawn(move || {
                    // Ends when every sender (the Batcher) is gone.
                    for job in rx.iter() {
                        observer.depth(rx.len());
                        observer.waited(job.queued.elapsed().as_secs_f64());
                        if job.reply.is_closed() {
                            continue; // the waiter gave up already
                        }
                        // A job that cannot finish before its deadline is answered
                        // now: under a flood, running it would only make the
                        // next ones late too (its waiter would be gone).
                        let expected = Duration::from_micros(recent.load(Ordering::Relaxed));
                        if Instant::now() + expected > job.deadline {
                            let _ = job.reply.send(Err(ModelError::Timeout(Duration::ZERO)));
                            continue;
                        }
                        let started = Instant::now();
                        let result = catch_unwind(AssertUnwindSafe(|| embed(&job.text)))
                            .unwrap_or_else(|_| Err(ModelError::Inference("encoder panicked".into())));
                        let took = started.elapsed();
                        observer.inferred(took.as_secs_f64());
                        let before = recent.load(Ordering::Relaxed);
                        let now_us = took.as_micros().min(u64::MAX as u128) as u64;
                        recent.store(if before == 0 { now_us } else { (before * 7 + now_us) / 8 }, Ordering::Relaxed);
                        let _ = job.reply.send(result);
                    }
                })
                .expect("spawning an inference thread");
        }
        Batcher { tx, depth, deadline, observer }
    }

    /// Embeds `text`, waiting at most the configured deadline.
    pub async fn embed(&self, text: String) -> Result<Vec<f32>, ModelError> {
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let job = Job { text, queued: now, deadline: now + self.deadline, reply };
        let sent = self.tx.try_send(job);
        self.observer.depth(self.tx.len());
        sent.map_err(|e| match e {
            TrySendError::Full(_) => ModelError::Overloaded(self.depth),
            TrySendError::Disconnected(_) => ModelError::Inference("inference threads stopped".into()),
        })?;
        match tokio::time::timeout(self.deadline, rx).await {
            Ok(Ok(result)) => result.map_err(|e| match e {
                ModelError::Timeout(_) => ModelError::Timeout(self.deadline),
                other => other,
            }),
            Ok(Err(_)) => Err(ModelError::Inference("inference thread dropped the request".into())),
            Err(_) => Err(ModelError::Timeout(self.deadline)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observes nothing.
    struct Unobserved;

    impl QueueObserver for Unobserved {
        fn depth(&self, _: usize) {}
        fn waited(&self, _: f64) {}
        fn inferred(&self, _: f64) {}
    }

    fn slow(ms: u64) -> EmbedFn {
        Arc::new(move |t: &str| {
            std::thread::sleep(Duration::from_millis(ms));
            if t == "panic" {
                panic!("boom");
            }
            Ok(vec![t.len() as f32])
        })
    }

    #[tokio::test]
    async fn answers_each_waiter_with_its_own_result() {
        let b = Arc::new(Batcher::start(slow(1), 2, 16, Duration::from_secs(5), Arc::new(Unobserved)));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.embed("x".repeat(i)).await.unwrap() })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), vec![i as f32]);
        }
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once_and_deadline_is_kept() {
        let b = Arc::new(Batcher::start(slow(300), 1, 2, Duration::from_millis(150), Arc::new(Unobserved)));
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let b = b.clone();
            waiters.push(tokio::spawn(async move { b.embed("a".into()).await }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // one running, two queued: the next is refused without waiting
        let started = Instant::now();
        assert!(matches!(b.embed("b".into()).await, Err(ModelError::Overloaded(2))));
        assert!(started.elapsed() < Duration::from_millis(50));
        for w in waiters {
            assert!(matches!(w.await.unwrap(), Err(ModelError::Timeout(_))));
        }
    }

    #[tokio::test]
    async fn a_panicking_encoder_fails_one_request_not_the_thread() {
        let b = Batcher::start(slow(0), 1, 4, Duration::from_secs(5), Arc::new(Unobserved));
        assert!(matches!(b.embed("panic".into()).await, Err(ModelError::Inference(_))));
        assert_eq!(b.embed("ok".into()).await.unwrap(), vec![2.0]);
    }
}
