//! The plugin API: a C program (tests/c/engine.c, built with the system cc here) drives
//! libtandem_speculate through tandem.h with its own model as callbacks; and the Rust example
//! that plugs a custom verifier into the decoder runs.

use crate::common::*;
use std::path::PathBuf;
use std::process::Command;

/// target/<profile>, where cargo put the tandem binary and the speculate cdylib.
fn target_dir() -> PathBuf {
    bin().parent().unwrap().to_path_buf()
}

fn cargo_build(args: &[&str]) {
    let release = target_dir().ends_with("release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).arg("build").args(args);
    if release {
        cmd.arg("--release");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn c_engine_drives_speculative_decoding_through_the_c_abi() {
    let dir = target_dir();
    // The library an engine links: the model-free core only (no candle, no tokenizers).
    cargo_build(&["-p", "tandem-speculate", "--lib", "--no-default-features"]);
    let tmp = tempfile::tempdir().unwrap();
    let exe = tmp.path().join("engine");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg(root().join("tests/c/engine.c"))
        .arg("-I")
        .arg(root().join("speculate/include"))
        .arg(format!("-L{}", dir.display()))
        .arg("-ltandem_speculate")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-Wall")
        .arg("-Werror")
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("a C compiler (cc) is needed for this test");
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.trim_end().ends_with("OK"),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn the_c_library_builds_without_the_model_stack() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args(["tree", "-p", "tandem-speculate", "--no-default-features"])
        .args(["-e", "normal", "--prefix", "none", "--offline"])
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && tree.contains("tandem-speculate"),
        "{tree}"
    );
    for heavy in ["tandem-model", "candle-core", "tokenizers", "safetensors"] {
        assert!(
            !tree.contains(heavy),
            "{heavy} in the model-free build:\n{tree}"
        );
    }
}

/// The example, compiled into this test (cargo builds examples with different features than
/// tests, so running `cargo build --example` from here rebuilt the CLI: two minutes of CI).
#[path = "../../examples/custom_verifier.rs"]
#[allow(dead_code)]
mod custom_verifier;

#[test]
fn custom_verifier_example_runs() {
    let s = custom_verifier::run().expect("the example runs");
    assert!(
        s.contains("verifier passes") && s.contains("drafts accepted"),
        "{s}"
    );
}
