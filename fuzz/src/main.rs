//! One AFL++ harness for every target: `fuzz-target <name>` runs
//! `mailtriage::fuzz::run(name, input)` in persistent mode. One binary
//! keeps the instrumented build to one link.
//!
//! Any panic aborts (AFL++ sees a crash), even one our code catches (extraction
//! runs the MIME parser under `catch_unwind`: a panic there is still a bug),
//! except one: mail-parser 0.11.9's own `debug_assert!(false, "Invalid part
//! ID, could not find multipart.")`, which release builds skip and recover
//! from. cargo-afl turns debug assertions on for every crate, so without this
//! every campaign would stop at the first nested message without a boundary.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if !mailtriage::fuzz::TARGETS.contains(&name.as_str()) {
        eprintln!("usage: fuzz-target <{}>", mailtriage::fuzz::TARGETS.join("|"));
        std::process::exit(2);
    }
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let upstream_assertion =
            info.location().is_some_and(|l| l.file().ends_with("mail-parser-0.11.9/src/parsers/message.rs"))
                && info.payload().downcast_ref::<&str>().is_some_and(|m| m.starts_with("Invalid part ID"));
        if !upstream_assertion {
            std::process::abort();
        }
    }));
    afl::fuzz_nohook!(|data: &[u8]| {
        mailtriage::fuzz::run(&name, data);
    });
}
