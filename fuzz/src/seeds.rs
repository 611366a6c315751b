//! `fuzz-seeds <target> <corpus-dir> <out-dir> [max]`: writes the starting
//! inputs of a target (see `mailtriage::fuzz::seeds`).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, corpus, out, rest @ ..] = args.as_slice() else {
        eprintln!("usage: fuzz-seeds <target> <corpus-dir> <out-dir> [max]");
        std::process::exit(2);
    };
    let max = rest.first().and_then(|m| m.parse().ok()).unwrap_or(64);
    let seeds = mailtriage::fuzz::seeds(target, std::path::Path::new(corpus), max);
    std::fs::create_dir_all(out).expect("creating the seed directory");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(std::path::Path::new(out).join(format!("seed-{i:04}")), s).expect("writing a seed");
    }
    println!("{target}: {} seeds in {out}", seeds.len());
}
