//! SIGINT, SIGTERM and SIGHUP while a command has its temporary on disk: every command that
//! writes (quantize, convert, calibrate, eval, a quantize sweep) exits with 128 + the signal
//! and leaves no temporary file, no half report and no folder it made.
//!
//! `TANDEM_TEST_PAUSE_AFTER_TEMP_MS` holds each command for a while right after it has made
//! its first temporary (the bundled model finishes in milliseconds otherwise), so the signal
//! lands while there is something to clean up, every time.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs `args` in `dir` (`{}` = the output path inside it), waits for anything new to appear
/// there, sends `signal` and checks the folder is as before.
fn interrupt(dir: &Path, args: &[String], signal: (&str, i32)) -> Result<(), String> {
    let before = names(dir);
    let mut child = Command::new(bin())
        .args(args)
        .env("TANDEM_TEST_PAUSE_AFTER_TEMP_MS", "20000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while names(dir) == before {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return Err(format!(
                "no temporary appeared: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let during = names(dir);
    let ok = Command::new("kill")
        .args([format!("-{}", signal.0), child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill failed");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    if code != Some(128 + signal.1) {
        return Err(format!("exit {code:?} (want {}): {err}", 128 + signal.1));
    }
    if !err.contains(&format!("interrupted by SIG{}", signal.0)) {
        return Err(format!("stderr: {err}"));
    }
    let after = names(dir);
    if after != before {
        return Err(format!(
            "left {after:?} (was {before:?}, {during:?} while running)"
        ));
    }
    Ok(())
}

#[test]
fn signals_leave_nothing_behind_in_any_writing_command() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // Inputs made once, without the pause: a GGUF of the bundled model and a short text.
    std::fs::create_dir_all(work.join("inputs")).unwrap();
    let gguf = stories_gguf_in(&work.join("inputs"), "stories.gguf");
    let st = stories();
    let text = work.join("inputs/text.txt");
    std::fs::write(
        &text,
        "Once upon a time there was a little girl. ".repeat(200),
    )
    .unwrap();

    let (m, g, t) = (
        st.to_string_lossy().into_owned(),
        gguf.to_string_lossy().into_owned(),
        text.to_string_lossy().into_owned(),
    );
    let commands: Vec<(&str, Vec<&str>)> = vec![
        (
            "quantize",
            vec!["quantize", &m, "--out", "{}/q.gguf", "--quiet"],
        ),
        ("convert", vec!["convert", &g, "--out", "{}/hf", "--quiet"]),
        (
            "calibrate",
            vec![
                "calibrate",
                &m,
                "--out",
                "{}/imatrix.gguf",
                "--ctx",
                "64",
                "--chunks",
                "2",
            ],
        ),
        (
            "eval",
            vec![
                "eval",
                "--reference",
                &m,
                "--model",
                &g,
                "--text",
                &t,
                "--ctx",
                "64",
                "--chunks",
                "2",
                "--out",
                "{}/report",
                "--quiet",
            ],
        ),
        (
            "sweep",
            vec![
                "quantize",
                &m,
                "--sweep",
                "q8_0,q4_0@all",
                "--eval-text",
                &t,
                "--ctx",
                "64",
                "--chunks",
                "2",
                "--out-dir",
                "{}/sweep",
                "--quiet",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (name, args) in &commands {
        for signal in [("INT", 2), ("TERM", 15), ("HUP", 1)] {
            let dir: PathBuf = work.join(format!("{name}-{}", signal.0));
            std::fs::create_dir(&dir).unwrap();
            let d = dir.to_string_lossy().into_owned();
            let args: Vec<String> = args.iter().map(|a| a.replace("{}", &d)).collect();
            if let Err(e) = interrupt(&dir, &args, signal) {
                failures.push(format!("{name} / SIG{}: {e}", signal.0));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
