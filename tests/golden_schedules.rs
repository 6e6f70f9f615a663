//! Conformance: every schedule's tables against `tests/golden/schedules.json` (float64
//! references from `shared/golden/`, cross-checked against Python diffusers), to relative 1e-9
//! (absolute 1e-15 near zero), through the library and through `diffuse schedule --json`.

use std::process::Command;

use diffuse::schedule::Schedule;
use serde_json::Value;

fn golden() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/schedules.json"
    ))
    .expect("golden file is committed");
    serde_json::from_str(&text).unwrap()
}

fn as_vec(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= 1e-9 * w.abs() || err <= 1e-15,
            "{what}[{i}] (t = {}): got {g:e}, want {w:e}, rel err {:e}",
            i + 1,
            err / w.abs()
        );
    }
}

const KINDS: [&str; 5] = ["linear", "scaled_linear", "quadratic", "cosine", "sigmoid"];

#[test]
fn library_tables_match_golden() {
    let g = golden();
    for kind in KINDS {
        for t in [1000usize, 150] {
            let key = format!("{kind}_T{t}");
            let want = &g["schedules"][&key];
            let s = Schedule::named(kind, t).unwrap();
            let fields: [(&str, &Vec<f64>); 13] = [
                ("beta", &s.beta),
                ("alpha", &s.alpha),
                ("alpha_bar", &s.alpha_bar),
                ("alpha_bar_prev", &s.alpha_bar_prev),
                ("sqrt_alpha_bar", &s.sqrt_alpha_bar),
                ("sqrt_one_minus_alpha_bar", &s.sqrt_one_minus_alpha_bar),
                ("sqrt_recip_alpha_bar", &s.sqrt_recip_alpha_bar),
                ("sqrt_recipm1_alpha_bar", &s.sqrt_recipm1_alpha_bar),
                ("posterior_variance", &s.posterior_variance),
                (
                    "posterior_log_variance_clipped",
                    &s.posterior_log_variance_clipped,
                ),
                ("posterior_mean_coef1", &s.posterior_mean_coef1),
                ("posterior_mean_coef2", &s.posterior_mean_coef2),
                ("snr", &s.snr),
            ];
            for (name, got) in fields {
                assert_close(&format!("{key}.{name}"), got, &as_vec(&want[name]));
            }
            // field notes 6: no infinities in the tables of the capped schedules.
            assert!(s.sqrt_recip_alpha_bar.iter().all(|v| v.is_finite()), "{key}");
        }
    }
}

#[test]
fn cli_json_matches_golden() {
    let g = golden();
    for kind in KINDS {
        for t in [1000usize, 150] {
            let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
                .args([
                    "schedule",
                    "--kind",
                    kind,
                    "--timesteps",
                    &t.to_string(),
                    "--json",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let got: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(got["kind"], kind);
            assert_eq!(got["timesteps"], t);
            let want = &g["schedules"][format!("{kind}_T{t}")];
            for name in ["beta", "alpha_bar", "posterior_variance", "snr"] {
                assert_close(
                    &format!("cli {kind} T{t} {name}"),
                    &as_vec(&got[name]),
                    &as_vec(&want[name]),
                );
            }
        }
    }
    // scaled-linear is accepted as a spelling of scaled_linear.
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args([
            "schedule",
            "--kind",
            "scaled-linear",
            "--timesteps",
            "150",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn cli_bad_parameters_exit_2_with_one_line() {
    let cases: [(&[&str], &str); 4] = [
        (&["--timesteps", "1"], "timesteps"),
        (&["--beta-start", "2"], "beta_start"),
        (&["--kind", "nope"], "kind"),
        (&["--kind", "cosine", "--beta-end", "0.5"], "beta_start/beta_end"),
    ];
    for (args, name) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .arg("schedule")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(name), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
