//! `[feedback]`: corrections from staff and gated retraining.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::section::section;
use super::values::de_duration;

section! {
    /// Continuous learning: corrections from staff and gated retraining.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct FeedbackConfig in "feedback" {
        /// Where corrections are kept: `sqlite:///path.db` or `postgres://…`.
        restart_with_section store: String,
        /// File holding the PostgreSQL password (first line), so it is not in
        /// this file or the URL; wins over a password in the URL.
        restart store_password_file: Option<PathBuf>,
        /// Mail to `local+department[+priority]@domain` of this address is a correction.
        live address: Option<String>,
        /// Feedback mail is delivered to nobody but this mailbox (none: discarded once recorded).
        live audit_copy: Option<String>,
        /// Corrections older than this are deleted.
        live retention_days: u64,
        /// File holding the bearer token `POST /feedback` requires (no file: no HTTP channel).
        restart http_token_file: Option<PathBuf>,
        /// Memory for recent decisions' features (corrections by Message-ID).
        restart recent_bytes: usize,
        /// With a PostgreSQL store, recent decisions are shared in the database
        /// for this long…
        #[serde(deserialize_with = "de_duration")]
        restart recent_max_age: Duration,
        /// …and at most this many rows (the newest kept).
        restart recent_max_rows: u64,
        /// This instance retrains (set false on all but one instance sharing a store).
        restart retrain: bool,
        /// Retrain this often…
        #[serde(deserialize_with = "de_duration")]
        restart retrain_every: Duration,
        /// …or once this many new corrections arrived.
        restart retrain_after: u64,
        /// Versioned head files and their pointers.
        restart heads_dir: PathBuf,
        /// The original labeled data (JSONL, as for `train`) retraining starts from.
        live training_data: Option<PathBuf>,
        /// The original dev split: part of the gate's evaluation.
        live dev_data: Option<PathBuf>,
        /// Embeddings of the original data, so retraining does not re-embed it.
        live embedding_cache: Option<PathBuf>,
        /// A department new to the head joins only with at least this many corrections.
        live min_per_class: usize,
        /// The newest this many corrections per class form the reservoir.
        live max_per_class: usize,
        /// Share of corrections (by id) held back for the gate, in percent.
        live holdout_percent: u8,
        /// The gate refuses a head when any language slice's macro-F1 drops more than this.
        live max_slice_drop: f64,
        /// Slices smaller than this are reported but not gated (too noisy).
        live min_slice: usize,
    }
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            store: "sqlite:///var/lib/mailtriage/feedback.db".into(),
            store_password_file: None,
            address: None,
            audit_copy: None,
            retention_days: 180,
            http_token_file: None,
            recent_bytes: 256 << 20,
            recent_max_age: Duration::from_secs(3 * 86_400),
            recent_max_rows: 1_000_000,
            retrain: true,
            retrain_every: Duration::from_secs(6 * 3600),
            retrain_after: 500,
            heads_dir: PathBuf::from("/var/lib/mailtriage/heads"),
            training_data: None,
            dev_data: None,
            embedding_cache: None,
            min_per_class: 5,
            max_per_class: 2000,
            holdout_percent: 20,
            max_slice_drop: 0.02,
            min_slice: 200,
        }
    }
}
