//! One message as the decision sees it: the [`envelope`] a front door
//! collected, and the features [`extract`] takes out of its raw bytes
//! (MIME decoded, [`html`] turned into text, every stage bounded).

pub mod envelope;
pub mod extract;
mod html;
pub mod language;
