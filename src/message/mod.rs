//! One message as the decision sees it: the [`envelope`] a front door
//! collected, the [`headers`] read straight from the raw bytes (for scope
//! and header edits), and the features [`extract`] takes out of them
//! (MIME decoded, `html` turned into text, every stage bounded).

pub mod envelope;
pub mod extract;
pub mod headers;
pub mod html;
pub mod language;
