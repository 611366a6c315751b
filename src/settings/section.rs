//! How a reload applies each key, declared where the key is: every field of
//! a section struct is written inside `section!` with one word in front of
//! it, so a new key cannot be added without saying whether a reload applies
//! it. `daemon::reload` reads what this generates.
//!
//! - `live`: the reload applies it (to new messages and connections).
//! - `restart`: bound or started once (a socket, the certificate, the next
//!   hop, the feedback store); when it changed, the reload names it in its
//!   "restart needed" warning.
//! - `restart_with_section`: as `restart`, and also named whenever its
//!   optional section appears or goes (the section's defining key, such as
//!   `relay.next_hop`).
//! - `derived`: not a key of the file (built from the others, `serde(skip)`).

/// How a reload applies a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Applied by the reload (to new messages and connections).
    Live,
    /// Needs a restart; the reload warns when it changed.
    Restart,
}

/// A section of the file (`[server]`, `[[rules]]`…), as `section!` declares it.
pub trait Section {
    /// The section's name in the file.
    const NAME: &'static str;
    /// Every key as `section.key`, with how a reload applies it.
    fn keys() -> Vec<(&'static str, Apply)>;
    /// The restart-only keys whose values differ between `self` and `new`;
    /// `appeared_or_went` when one side is the section's defaults standing in
    /// for an absent section.
    fn restart_changes(&self, new: &Self, appeared_or_went: bool) -> Vec<&'static str>;
}

/// Declares a section struct and, from the word before each field, its
/// [`Section`] impl. Attributes (docs, serde) pass through unchanged.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident in $section:literal {
            $(
                $(#[$fmeta:meta])*
                $apply:ident $field:ident : $ty:ty
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $crate::settings::section::Section for $name {
            const NAME: &'static str = $section;
            #[allow(clippy::vec_init_then_push)]
            fn keys() -> Vec<(&'static str, $crate::settings::section::Apply)> {
                let mut keys = Vec::new();
                $( $crate::settings::section::section!(@key $apply keys $section $field); )*
                keys
            }
            fn restart_changes(&self, new: &Self, appeared_or_went: bool) -> Vec<&'static str> {
                // A section of live keys only compares nothing.
                let _ = (new, appeared_or_went);
                #[allow(unused_mut)]
                let mut changed = Vec::new();
                $( $crate::settings::section::section!(@cmp $apply self new appeared_or_went changed $section $field); )*
                changed
            }
        }
    };
    (@key live $keys:ident $section:literal $field:ident) => {
        $keys.push((concat!($section, ".", stringify!($field)), $crate::settings::section::Apply::Live))
    };
    (@key restart $keys:ident $section:literal $field:ident) => {
        $keys.push((concat!($section, ".", stringify!($field)), $crate::settings::section::Apply::Restart))
    };
    (@key restart_with_section $keys:ident $section:literal $field:ident) => {
        $keys.push((concat!($section, ".", stringify!($field)), $crate::settings::section::Apply::Restart))
    };
    (@key derived $keys:ident $section:literal $field:ident) => {};
    (@cmp live $a:ident $b:ident $presence:ident $out:ident $section:literal $field:ident) => {};
    (@cmp derived $a:ident $b:ident $presence:ident $out:ident $section:literal $field:ident) => {};
    (@cmp restart $a:ident $b:ident $presence:ident $out:ident $section:literal $field:ident) => {
        if $a.$field != $b.$field {
            $out.push(concat!($section, ".", stringify!($field)));
        }
    };
    (@cmp restart_with_section $a:ident $b:ident $presence:ident $out:ident $section:literal $field:ident) => {
        if $presence || $a.$field != $b.$field {
            $out.push(concat!($section, ".", stringify!($field)));
        }
    };
}

pub(crate) use section;

/// The restart-only keys that differ in an optional section; an absent
/// section compares as its defaults.
pub fn optional_changes<S: Section + Default>(running: Option<&S>, new: Option<&S>) -> Vec<&'static str> {
    match (running, new) {
        (Some(a), Some(b)) => a.restart_changes(b, false),
        (None, None) => Vec::new(),
        (Some(a), None) => a.restart_changes(&S::default(), true),
        (None, Some(b)) => S::default().restart_changes(b, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    section! {
        #[derive(Debug, Default)]
        pub struct Probe in "probe" {
            /// A documented key.
            live a: u32,
            restart b: u32,
            restart_with_section c: u32,
            derived d: u32,
        }
    }

    #[test]
    fn each_word_declares_how_a_reload_applies_the_key() {
        assert_eq!(
            Probe::keys(),
            [("probe.a", Apply::Live), ("probe.b", Apply::Restart), ("probe.c", Apply::Restart)],
            "derived fields are not keys"
        );
        let base = Probe::default();
        let all = Probe { a: 1, b: 1, c: 1, d: 1 };
        assert_eq!(all.a + all.d, 2, "live and derived fields are plain fields");
        assert_eq!(base.restart_changes(&all, false), ["probe.b", "probe.c"]);
        assert!(optional_changes::<Probe>(None, None).is_empty());
        assert_eq!(
            optional_changes(None, Some(&base)),
            ["probe.c"],
            "the section appeared, its other keys at defaults"
        );
        assert_eq!(optional_changes(Some(&all), None), ["probe.b", "probe.c"]);
    }
}
