//! Copies every test guest image into a directory (the TypeScript tests and benchmarks use
//! target/testguests/): `cargo run -p microcell-testguest --bin testguest-export -- <dir>`.

use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let [dir] = args.as_slice() else {
        eprintln!("usage: testguest-export <dir>");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    if let Err(e) = fs::create_dir_all(&dir) {
        eprintln!("testguest-export: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for name in testguest::ALL {
        let to = dir.join(name);
        if let Err(e) = fs::copy(testguest::path(name), &to) {
            eprintln!("testguest-export: cannot copy {name} to {}: {e}", to.display());
            return ExitCode::FAILURE;
        }
        println!("{}", to.display());
    }
    ExitCode::SUCCESS
}
