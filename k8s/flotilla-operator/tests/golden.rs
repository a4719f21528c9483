//! Golden tests: what the operator makes of the overlays' Flotilla
//! resources, compared with the YAML committed under `tests/golden/`. A
//! change to what the operator makes shows in review as a change to
//! those files; `UPDATE_GOLDEN=1 cargo test -p flotilla-operator` writes
//! them again.

use flotilla_core::crd::Flotilla;
use flotilla_operator::{render, secrets::Generated};

fn check(overlay: &str) {
    let dir = env!("CARGO_MANIFEST_DIR");
    let input =
        std::fs::read_to_string(format!("{dir}/../overlays/{overlay}/flotilla.yaml")).unwrap();
    let mut f: Flotilla = serde_yaml::from_str(&input).unwrap();
    f.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    let docs: Vec<String> = render::render(
        &f,
        "ghcr.io/flotilla-dev/flotilla:test",
        &Generated::fixed(),
    )
    .iter()
    .map(|d| serde_yaml::to_string(&d.object).unwrap())
    .collect();
    let got = format!("---\n{}", docs.join("---\n"));
    let path = format!("{dir}/tests/golden/{overlay}.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        got == want,
        "{path} differs from what the operator renders now; if the change is meant, run UPDATE_GOLDEN=1 cargo test -p flotilla-operator and review the diff"
    );
}

#[test]
fn dev() {
    check("dev");
}

#[test]
fn prod() {
    check("prod");
}

#[test]
fn edge() {
    check("edge");
}
