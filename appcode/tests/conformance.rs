//! The conformance vectors on every engine: the checked engine (without the verifier), and
//! rbpf's JIT and interpreter after `rewrite::for_rbpf`, each exact on every ISA v1–v3
//! vector; everything else is refused with a reason. The harness is
//! `examples/conformance.rs`, a process of its own, whose rbpf runs are children again, so
//! that a misbehaving engine cannot take the test runner down.

use std::process::Command;

#[test]
fn every_engine_is_exact_on_the_conformance_vectors() {
    if let Err(why) = appcode::vectors::dir() {
        return println!("skipped: {why}");
    }
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
