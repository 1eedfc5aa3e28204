//! The conformance vectors through rbpf after `rewrite::for_rbpf`: the JIT and the
//! interpreter are both exact on every ISA v1–v3 vector, everything else is refused with a
//! reason. Each vector runs in a child process (examples/conformance.rs), so that
//! a misbehaving engine cannot take the test runner down.

use std::process::Command;

#[test]
fn rbpf_is_exact_on_the_conformance_vectors_after_rewriting() {
    let exe = std::env::current_exe().unwrap();
    let harness = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples/conformance");
    assert!(
        harness.exists(),
        "{} missing: cargo test builds it",
        harness.display()
    );
    let out = Command::new(&harness)
        .args(["--rewrite", "--check"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("check passed"));
}
