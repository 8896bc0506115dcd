//! Each invalid clusterfile in `tests/fixtures/invalid/` fails validation with exit code 2 and the
//! diagnostic in its snapshot.

use crate::support::{ccluster, files};

#[test]
fn invalid_fixtures_are_diagnosed() {
    let fixtures = files("tests/fixtures/invalid", &["toml", "kdl"]);
    assert!(
        fixtures.len() >= 40,
        "expected at least 40 invalid fixtures, found {}",
        fixtures.len()
    );
    for file in fixtures {
        let run = ccluster(&["validate", &file]);
        assert_eq!(
            run.code, 2,
            "{file} should be invalid; stdout: {} stderr: {}",
            run.stdout, run.stderr
        );
        assert!(
            !run.stderr.contains("panicked"),
            "{file} panicked:\n{}",
            run.stderr
        );
        let name = file.rsplit('/').next().unwrap().to_string();
        insta::assert_snapshot!(name, run.stderr);
    }
}

#[test]
fn json_diagnostics_carry_line_and_column() {
    let run = ccluster(&[
        "validate",
        "--format",
        "json",
        "tests/fixtures/invalid/97-multi-mistakes-all-reported.toml",
    ]);
    assert_eq!(run.code, 2);
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON diagnostics");
    let items = doc["diagnostics"].as_array().unwrap();
    assert!(items.len() >= 3, "{items:?}");
    for d in items {
        assert!(
            d["line"].as_u64().is_some() && d["column"].as_u64().is_some(),
            "{d}"
        );
        assert_eq!(
            d["file"],
            "tests/fixtures/invalid/97-multi-mistakes-all-reported.toml"
        );
    }
}
