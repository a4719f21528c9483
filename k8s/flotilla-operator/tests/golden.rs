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

/// `spec.jwksSecret`: every router, broker and gateway pod mounts the
/// Secret where `FLOTILLA_JWKS_DIR` (in the shared ConfigMap) says.
#[test]
fn a_jwks_secret_is_mounted_where_the_components_read_it() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let input = std::fs::read_to_string(format!("{dir}/../overlays/prod/flotilla.yaml")).unwrap();
    let mut f: Flotilla = serde_yaml::from_str(&input).unwrap();
    f.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    f.spec.jwks_secret = Some("plant-jwks".into());
    let objects = render::render(&f, "img:test", &Generated::fixed());
    let config = objects
        .iter()
        .find(|d| d.kind() == "ConfigMap")
        .expect("config map");
    let dir_env = config.object["data"]["FLOTILLA_JWKS_DIR"]
        .as_str()
        .expect("FLOTILLA_JWKS_DIR");
    let mut mounted = 0;
    for d in objects
        .iter()
        .filter(|d| matches!(d.kind(), "Deployment" | "StatefulSet"))
    {
        let spec = &d.object["spec"]["template"]["spec"];
        let has_volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "plant-jwks");
        let has_mount = spec["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == dir_env);
        assert!(
            has_volume && has_mount,
            "{} mounts the JWKS Secret",
            d.name()
        );
        mounted += 1;
    }
    assert!(mounted >= 3, "routers, brokers and gateways: {mounted}");
}
