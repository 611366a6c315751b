//! One AFL++ harness for every target: `fuzz-target <name>` runs
//! `mailtriage::fuzz::run(name, input)` under `afl::fuzz!` (persistent mode).
//! One binary keeps the instrumented build to one link.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if !mailtriage::fuzz::TARGETS.contains(&name.as_str()) {
        eprintln!("usage: fuzz-target <{}>", mailtriage::fuzz::TARGETS.join("|"));
        std::process::exit(2);
    }
    afl::fuzz!(|data: &[u8]| {
        mailtriage::fuzz::run(&name, data);
    });
}
