//! What the subcommands other than `serve` and `check-config` do: the
//! offline tools (`classify`, `train`, `eval`, `replay`, `model fetch`) and
//! the continuous-learning ones (`feedback`, `retrain`, `heads`, `report`),
//! and the admin's (`config show`, `generate` for packagers).

pub mod generate;
pub mod learn;
pub mod offline;
