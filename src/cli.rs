//! Command-line interface: the subcommands and their arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Routes each message crossing your mail relay to the right department.
#[derive(Debug, Parser)]
#[command(name = "mailtriage", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Default: /etc/mailtriage/mailtriage.toml if
    /// installed, else the shipped conf/mailtriage.toml.
    #[arg(short, long, global = true, env = "MAILTRIAGE_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The configuration file to use.
    pub fn config_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| {
            let system = PathBuf::from("/etc/mailtriage/mailtriage.toml");
            if system.exists() {
                system
            } else {
                PathBuf::from("conf/mailtriage.toml")
            }
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: listen as a milter and decide every message.
    Serve,
    /// Decide message files offline and print, per file, one JSON object with
    /// the decision and the exact changes the milter would make.
    Classify {
        /// Envelope sender to assume (`""` or `<>` for the null sender of a
        /// bounce). Default: the message's Return-Path (what a delivered
        /// message carries), else its From address; a message with neither
        /// is from an unknown sender, not a bounce.
        #[arg(long)]
        mail_from: Option<String>,
        /// Envelope recipient to assume; repeat for several. Default: the
        /// addresses in To and Cc.
        #[arg(long = "rcpt")]
        rcpts: Vec<String>,
        /// The SMTP client's address to assume (for `scope.skip_networks`
        /// and `scope.trusted_relays`).
        #[arg(long)]
        client_addr: Option<std::net::IpAddr>,
        /// Assume the sender authenticated (for `scope.skip_authenticated`).
        #[arg(long)]
        authenticated: bool,
        /// The MTA listener to assume, its `{daemon_name}` (for `scope.skip_listeners`).
        #[arg(long)]
        listener: Option<String>,
        /// Add `explain`: each rule tried, in order, and why it did or did
        /// not match (the values it was tried on); for a model decision also
        /// the runner-up department with its probability and the message's
        /// terms that weighed most for the chosen one.
        #[arg(long)]
        explain: bool,
        /// RFC 5322 message files (.eml; a leading mbox "From " line is skipped).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate the configuration (and load the model files it names) and
    /// exit: 0 if valid, 2 with the offending key, rule, regex or file named.
    CheckConfig,
    /// Learn a department or priority head from labeled mail.
    Train(TrainArgs),
    /// Measure a head on labeled mail: accuracy, macro-F1, per class, confusion, calibration.
    Eval(EvalArgs),
    /// Show, per message of a Maildir tree, what the daemon would do (nothing is sent).
    Replay {
        /// A folder of messages: Maildir (cur/, new/), loose files or mbox files, any depth.
        #[arg(long)]
        maildir: PathBuf,
    },
    /// Model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// The configuration as the daemon reads it.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a man page or a shell completion script (for packagers).
    Generate {
        #[arg(value_enum)]
        what: Generated,
        /// For `man`: write mailtriage.1 and one page per subcommand
        /// (mailtriage-serve.1, mailtriage-heads-list.1…) into this folder
        /// instead of mailtriage.1 to stdout.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Record a correction: the message on stdin (or FILE) belongs to this
    /// department and/or priority. With --message-id, the running daemon
    /// looks the message up among its recent decisions instead.
    Feedback(FeedbackArgs),
    /// Retrain the heads from the original data plus the corrections, and
    /// promote each only if the gate passes.
    Retrain {
        /// Which head: department, priority, or both (default).
        #[arg(long)]
        head: Option<HeadArg>,
        /// Print each outcome as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Promoted head versions.
    #[command(subcommand)]
    Heads(HeadsCommand),
    /// Erase every trace of one message (corrections, recent decision, audit
    /// lines) or of one sender's corrections: erasure on request (GDPR Art. 17).
    Forget(ForgetArgs),
    /// Figures for the people paying for it: auto-routed share, review share,
    /// corrections per department per day, estimated staff minutes saved.
    Report {
        /// The last this many days.
        #[arg(long, default_value_t = 7)]
        days: u64,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    /// The message's Message-ID (angle brackets optional).
    #[arg(long, required_unless_present = "sender", conflicts_with = "sender")]
    pub message_id: Option<String>,
    /// The address a person sent corrections from.
    #[arg(long)]
    pub sender: Option<String>,
    /// Print what was erased as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum HeadArg {
    Department,
    Priority,
}

#[derive(Debug, clap::Args)]
pub struct FeedbackArgs {
    /// The right department (a configured department name or a head label).
    #[arg(long)]
    pub department: Option<String>,
    /// The right priority.
    #[arg(long)]
    pub priority: Option<String>,
    /// Correct a recent decision by its Message-ID (asks the daemon over
    /// `[metrics] listen` with the `[feedback] http_token_file` token).
    #[arg(long, conflicts_with = "file")]
    pub message_id: Option<String>,
    /// The message (RFC 822); default: stdin.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum HeadsCommand {
    /// Every version with its gate figures; `*` marks the one in use.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Make an earlier version current again (the daemon swaps it in).
    Rollback {
        /// `v3` or `3`.
        version: String,
        /// Which head (default: department).
        #[arg(long, default_value = "department")]
        head: HeadArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective settings: the file with the `MAILTRIAGE__…`
    /// environment overrides applied, secrets masked (like `postconf -n`).
    Show,
}

/// What `generate` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Generated {
    /// mailtriage(1) and a page per subcommand, roff.
    Man,
    CompleteBash,
    CompleteZsh,
    CompleteFish,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download `[model] id` from the Hugging Face hub into its cache (HF_HOME;
    /// with HF_HUB_OFFLINE=1 only check the cache).
    Fetch,
}

/// Where labeled mail comes from.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// JSONL with `subject` and `body` (or `raw`, a whole RFC 822 message) and the label field.
    #[arg(long, conflicts_with = "maildir", required_unless_present = "maildir")]
    pub data: Option<PathBuf>,
    /// A folder per department (its name is the label) holding a Maildir, message files or mbox files.
    #[arg(long)]
    pub maildir: Option<PathBuf>,
    /// The JSONL field holding the label (`queue`, `priority`…); ignored with --maildir.
    #[arg(long, default_value = "department")]
    pub label: String,
    /// Keep embeddings of already-seen texts in this file, to re-run quickly.
    #[arg(long)]
    pub embedding_cache: Option<PathBuf>,
    /// Threads for embedding (default: the number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl DataArgs {
    /// Embedding threads: as given, else one per core.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to write the head (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Lexical features only: no encoder needed, much faster, weaker on short English mail.
    #[arg(long)]
    pub no_embeddings: bool,
    /// L-BFGS iterations at most per fit, for `--loss logistic` (it stops sooner once converged;
    /// the squared hinge is solved exactly in the dual, without this cap).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_iterations: u32,
    /// L2 regularisation of the summed loss (1/C in scikit-learn's terms): larger = smoother head.
    /// Default: 0.1 with the logistic loss, 1 with squared_hinge.
    #[arg(long, value_parser = non_negative)]
    pub l2: Option<f32>,
    /// Training loss: squared_hinge (one-vs-rest, a linear SVM's loss) or logistic (multinomial
    /// cross-entropy). Both give calibrated probabilities through the fitted temperature.
    #[arg(long, default_value = "squared_hinge", value_parser = loss)]
    pub loss: mailtriage::learn::train::Loss,
    /// Share of each class held back to calibrate and to report dev figures.
    #[arg(long, default_value_t = 0.15, value_parser = fraction)]
    pub dev_fraction: f32,
    /// Weight of the (standardised) embedding block relative to each lexical block: lower = the
    /// head leans on words more. 0.5 beat 1 and 2 on the ticket dev folds.
    #[arg(long, default_value_t = 0.5, value_parser = non_negative)]
    pub embedding_weight: f32,
    /// Hashed feature space: 2^bits buckets (1–30).
    #[arg(long, default_value_t = 18, value_parser = clap::value_parser!(u8).range(1..=30))]
    pub bits: u8,
    /// Longest word n-gram: 3 (words, pairs and triples) or 2 (words and pairs).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=3))]
    pub word_ngrams: u8,
    /// Weight of the character 3–5-gram block (0 = words only).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    pub char_weight: f32,
    /// Do not weight classes by inverse frequency.
    #[arg(long)]
    pub unbalanced: bool,
    /// Lean a class-weighted head back towards the real class frequencies: 0 = not at all (best macro-F1),
    /// 1 = fully (best accuracy).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub prior_shift: f32,
    /// Keep the model fitted on the train part instead of refitting on all data.
    #[arg(long)]
    pub no_refit: bool,
    /// Also try character block on/off, class weighting on/off and the
    /// embedding weight halved, keeping the best on the dev split (8 fits; worth it only
    /// with a dev split of thousands of messages).
    #[arg(long)]
    pub search: bool,
    /// With embeddings, also train a lexical-only head that decides alone
    /// (no encoder) where its margin says the encoder would change little:
    /// on the dev split, skipping the encoder may cost at most this much
    /// accuracy and macro-F1 (0.003 = 0.3 points), measured and expected.
    /// Negative: no cascade.
    #[arg(long, default_value_t = 0.003, allow_negative_numbers = true)]
    pub cascade_tolerance: f64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The head to measure (default: the configured head trained on --label).
    #[arg(long)]
    pub head: Option<PathBuf>,
    /// Print one JSON object (keys include n, accuracy, macro_f1, ece).
    #[arg(long)]
    pub json: bool,
    /// Also report figures per value of this field (repeatable), e.g. --slice language.
    #[arg(long)]
    pub slice: Vec<String>,
}

/// A training loss by name.
fn loss(s: &str) -> Result<mailtriage::learn::train::Loss, String> {
    mailtriage::learn::train::Loss::from_name(s)
        .ok_or_else(|| format!("`{s}` is not a loss: use logistic or squared_hinge"))
}

/// A finite number ≥ 0 (a weight or a penalty).
fn non_negative(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(_) => Err(format!("`{s}` must be a finite number ≥ 0")),
        Err(e) => Err(format!("`{s}` is not a number: {e}")),
    }
}

/// A number from 0 to 1.
fn fraction(s: &str) -> Result<f32, String> {
    let v = non_negative(s)?;
    if v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("`{s}` must be between 0 and 1"))
    }
}
