//! `diffuse toy`: the command-line contract (names, outputs, exit codes).

use std::path::Path;
use std::process::{Command, Output};

use diffuse::gmm::Gmm;
use diffuse::io::read_npy;

const MIX: &str = r#"{"weights": [0.5, 0.3, 0.2], "means": [[-2, 0], [1.5, 1], [1, -1.5]],
 "covariances": [[[0.6, 0.25], [0.25, 0.2]], [[0.1, -0.05], [-0.05, 0.4]], [[0.04, 0], [0, 0.04]]]}"#;

fn diffuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = diffuse(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts exit code 2 and a one-line error containing `needle`.
fn bad(args: &[&str], needle: &str) {
    let out = diffuse(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

fn setup() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let mix = dir.path().join("mix.json");
    std::fs::write(&mix, MIX).unwrap();
    let spec = format!("gmm:{}", mix.display());
    (dir, spec)
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn sample_writes_npy_plot_and_json() {
    let (dir, spec) = setup();
    let (out, png, traj) = (
        p(dir.path(), "s.npy"),
        p(dir.path(), "s.png"),
        p(dir.path(), "t.png"),
    );
    let json = ok(&[
        "toy",
        "sample",
        "--oracle",
        &spec,
        "--sampler",
        "ddim",
        "--process",
        "ddpm",
        "--steps",
        "20",
        "--n",
        "300",
        "--seed",
        "1",
        "--out",
        &out,
        "--plot",
        &png,
        "--trajectory",
        &traj,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["nfe"], 20);
    assert_eq!(v["sampler"], "ddim");
    let a = read_npy(Path::new(&out)).unwrap();
    assert_eq!(a.shape, vec![300, 2]);
    assert!(a.data.iter().all(|x| x.is_finite()));
    for f in [&png, &traj] {
        let img = image::open(f).unwrap();
        assert!(img.width() > 500);
    }
    // the batch size does not change the samples (field notes, bug 9)
    let out2 = p(dir.path(), "s2.npy");
    ok(&[
        "toy",
        "sample",
        "--oracle",
        &spec,
        "--sampler",
        "ddim",
        "--process",
        "ddpm",
        "--steps",
        "20",
        "--n",
        "300",
        "--seed",
        "1",
        "--out",
        &out2,
        "--batch",
        "7",
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

#[test]
fn every_sampler_process_pair_runs_from_the_cli() {
    let (dir, spec) = setup();
    let out = p(dir.path(), "x.npy");
    // every pair the registry declares (`diffuse samplers --json`)
    let table: serde_json::Value = serde_json::from_str(&ok(&["samplers", "--json"])).unwrap();
    let pairs: Vec<(String, Vec<String>, bool)> = table["samplers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let procs = s["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect();
            (
                s["name"].as_str().unwrap().to_string(),
                procs,
                s["adaptive"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(pairs.len() >= 18, "{} samplers", pairs.len());
    for (sampler, processes, adaptive) in &pairs {
        for process in processes {
            let mut args = vec![
                "toy",
                "sample",
                "--oracle",
                &spec,
                "--sampler",
                sampler,
                "--process",
                process,
            ];
            if !adaptive {
                args.extend(["--steps", "10"]);
            }
            args.extend(["--n", "40", "--seed", "2", "--out", &out]);
            ok(&args);
            assert_eq!(
                read_npy(Path::new(&out)).unwrap().shape,
                vec![40, 2],
                "{sampler} on {process}"
            );
        }
    }
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let (dir, spec) = setup();
    let out = p(dir.path(), "x.npy");
    let base = |sampler: &'static str, process: &'static str| {
        vec![
            "toy",
            "sample",
            "--sampler",
            sampler,
            "--process",
            process,
            "--n",
            "10",
            "--seed",
            "0",
            "--out",
        ]
    };
    let mut a = base("ddpm", "ve");
    a.extend([out.as_str(), "--oracle", &spec]);
    bad(&a, "does not run on --process ve");
    let mut a = base("edm-heun", "ddpm");
    a.extend([out.as_str(), "--oracle", &spec]);
    bad(&a, "does not run on --process ddpm");
    let mut a = base("ddpm", "ddpm");
    a.extend([out.as_str(), "--oracle", &spec, "--steps", "0"]);
    bad(&a, "steps");
    let mut a = base("ddpm", "ddpm");
    a.extend([out.as_str(), "--oracle", &spec, "--steps", "1001"]);
    bad(&a, "1001");
    let mut a = base("ddim", "ddpm");
    a.extend([out.as_str(), "--oracle", &spec, "--eta", "2"]);
    bad(&a, "eta");
    let mut a = base("ddpm", "vp");
    a.extend([out.as_str(), "--oracle", &spec]);
    bad(&a, "does not run on");
    let mut a = base("ode-euler", "vp");
    a.extend([out.as_str(), "--oracle", &spec, "--eta", "0.5"]);
    bad(&a, "--eta applies only to ddim");
    let mut a = base("ddpm", "nope");
    a.extend([out.as_str(), "--oracle", &spec]);
    bad(&a, "unknown process 'nope'");
    let mut a = base("ddpm2", "ddpm");
    a.extend([out.as_str(), "--oracle", &spec]);
    bad(&a, "unknown sampler 'ddpm2'");
    let mut a = base("ddpm", "ve");
    a.extend([out.as_str(), "--oracle", "mix.json"]);
    bad(&a, "expected gmm:FILE.json");
    let mut a = base("ddpm", "ddpm");
    a.extend([out.as_str(), "--checkpoint", "some/dir"]);
    bad(&a, "some/dir: no such directory");
    // a bad mixture file: the error names the file and the problem
    let wrong = dir.path().join("wrong.json");
    std::fs::write(
        &wrong,
        r#"{"weights": [0.5, 0.6], "means": [[0, 0], [1, 1]], "stds": [1, 1]}"#,
    )
    .unwrap();
    let wspec = format!("gmm:{}", wrong.display());
    let mut a = base("ddpm", "ddpm");
    a.extend([out.as_str(), "--oracle", &wspec]);
    bad(&a, "weights sum to 1.1");
    let missing = format!("gmm:{}", dir.path().join("missing.json").display());
    let mut a = base("ddpm", "ddpm");
    a.extend([out.as_str(), "--oracle", &missing]);
    bad(&a, "missing.json");
    let mut a = base("ddpm", "ve");
    a.extend([out.as_str(), "--oracle", &spec, "--schedule", "cosine"]);
    bad(&a, "--schedule and --timesteps apply to --process ddpm");
}

/// A float64 .npy (the library writes float32 only; `toy nll` reads both).
fn write_npy_f64(path: &Path, rows: usize, cols: usize, data: &[f64]) {
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn nll_writes_the_contract_json_and_matches_the_mixture() {
    let (dir, spec) = setup();
    let g = Gmm::from_json(MIX, Path::new("mix.json")).unwrap();
    let mut pts = g.sample(5, 3);
    pts.extend_from_slice(&[6.0, -5.0]); // far from the data
    let points = dir.path().join("pts.npy");
    write_npy_f64(&points, 6, 2, &pts);
    let out = p(dir.path(), "nll.json");
    for process in ["vp", "subvp", "seed-ve"] {
        ok(&[
            "toy",
            "nll",
            "--oracle",
            &spec,
            "--process",
            process,
            "--points",
            points.to_str().unwrap(),
            "--out",
            &out,
        ]);
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let ll: Vec<f64> = v["log_likelihood"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(ll.len(), 6);
        // defaults with the oracle: start at t = 0 and exact prior, so the clean mixture density
        // is reproduced to the RK45 tolerance (1e-6): 1e-3 nats is the acceptance bound (issue
        // 17), the far point included (measured at most 5.2e-4; 6e-3 at the old 1e-5)
        let mut worst: f64 = 0.0;
        for (l, x) in ll.iter().zip(pts.chunks(2)) {
            let e = (l - g.log_density(x)).abs();
            assert!(e < 1e-3, "{process}: {l} vs {}", g.log_density(x));
            worst = worst.max(e);
        }
        // what the user got is in `tolerance`: with the oracle, the true worst error
        let tolerance = v["tolerance"].as_f64().unwrap();
        assert!(
            (tolerance - worst).abs() <= 1e-9 * worst.max(1.0),
            "{tolerance} vs {worst}"
        );
        assert!(v["tolerance_method"].as_str().unwrap().starts_with("exact"));
        // and the a-posteriori estimate beside it tracks that error
        let estimate: Vec<f64> = v["error_estimate"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let worst_estimate = estimate.iter().copied().fold(0.0, f64::max);
        assert!(
            worst_estimate >= 0.5 * worst && worst_estimate <= 2.0 * worst,
            "{worst_estimate} vs {worst}"
        );
        let mean = ll.iter().sum::<f64>() / 6.0;
        assert!((v["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
        assert!((v["bits_per_dim"].as_f64().unwrap() + mean / (2.0 * std::f64::consts::LN_2)).abs() < 1e-12);
        assert!(v["nfe"].as_u64().unwrap() > 10);
    }
    // float32 points are accepted too; a wrong shape and a discrete process are not
    let p32 = dir.path().join("p32.npy");
    let f: Vec<f32> = pts.iter().map(|v| *v as f32).collect();
    diffuse::io::write_npy_f32(&p32, &[6, 2], &f).unwrap();
    ok(&[
        "toy",
        "nll",
        "--oracle",
        &spec,
        "--process",
        "ve",
        "--points",
        p32.to_str().unwrap(),
        "--out",
        &out,
    ]);
    let p3 = dir.path().join("p3.npy");
    diffuse::io::write_npy_f32(&p3, &[2, 3], &[0.0; 6]).unwrap();
    bad(
        &[
            "toy",
            "nll",
            "--oracle",
            &spec,
            "--process",
            "vp",
            "--points",
            p3.to_str().unwrap(),
            "--out",
            &out,
        ],
        "shape [N, 2]",
    );
    bad(
        &[
            "toy",
            "nll",
            "--oracle",
            &spec,
            "--process",
            "ddpm",
            "--points",
            p32.to_str().unwrap(),
            "--out",
            &out,
        ],
        "continuous process",
    );
}

#[test]
fn score_field_draws_a_png() {
    let (dir, spec) = setup();
    let out = p(dir.path(), "sf.png");
    ok(&[
        "toy",
        "score-field",
        "--oracle",
        &spec,
        "--process",
        "ve",
        "--t",
        "0.1,0.5",
        "--out",
        &out,
    ]);
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (1120, 580));
    bad(
        &[
            "toy",
            "score-field",
            "--oracle",
            &spec,
            "--process",
            "ve",
            "--t",
            "0,0.5",
            "--out",
            &out,
        ],
        "--t",
    );
}

#[test]
fn sample_from_init_noise_follows_the_file() {
    use candle_core::{DType, Device};
    use diffuse::process::Process;
    use diffuse::samplers::{
        build_sampler, sample_batched_from, InitNoise, NoObserver, SamplerKind, SamplerOptions,
    };
    let (dir, spec) = setup();
    let z: Vec<f64> = (0..10).map(|i| ((i * 7 % 10) as f64 - 4.5) / 3.0).collect();
    let zfile = p(dir.path(), "z.npy");
    write_npy_f64(Path::new(&zfile), 5, 2, &z);
    let out = p(dir.path(), "s.npy");
    let json = ok(&[
        "toy",
        "sample",
        "--oracle",
        &spec,
        "--process",
        "ddpm",
        "--sampler",
        "ddim",
        "--steps",
        "10",
        "--seed",
        "3",
        "--init-noise",
        &zfile,
        "--out",
        &out,
        "--json",
    ]);
    assert!(json.contains("\"n\":5"), "{json}");
    assert!(json.contains("z.npy"), "{json}");
    // the same run through the library
    let g = Gmm::from_json_file(Path::new(spec.strip_prefix("gmm:").unwrap())).unwrap();
    let oracle = diffuse::oracle::Oracle::new(g);
    let process = Process::from_name("ddpm", || diffuse::schedule::Schedule::named("linear", 1000)).unwrap();
    let s = build_sampler(
        SamplerKind::from_name("ddim").unwrap(),
        &process,
        &SamplerOptions {
            steps: Some(10),
            ..Default::default()
        },
    )
    .unwrap();
    let init = InitNoise::from_npy(Path::new(&zfile), &[2]).unwrap();
    let want = sample_batched_from(
        s.as_ref(),
        &oracle,
        5,
        &[2],
        3,
        5,
        Some(&init),
        DType::F64,
        &Device::Cpu,
        &mut NoObserver,
    )
    .unwrap()
    .x
    .flatten_all()
    .unwrap()
    .to_vec1::<f64>()
    .unwrap();
    let got = read_npy(Path::new(&out)).unwrap();
    assert_eq!(got.shape, vec![5, 2]);
    for (a, b) in got.data.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    }
    // bad files: wrong width, NaN, rows != --n
    let wide = p(dir.path(), "wide.npy");
    write_npy_f64(Path::new(&wide), 2, 3, &[0.0; 6]);
    let base = [
        "toy",
        "sample",
        "--oracle",
        &spec,
        "--process",
        "ddpm",
        "--sampler",
        "ddim",
        "--seed",
        "0",
        "--out",
        &out,
    ];
    let with = |f: &str, extra: &[&str]| {
        let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        v.push("--init-noise".into());
        v.push(f.into());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = with(&wide, &[]);
    bad(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>(), "wide.npy");
    let nan = p(dir.path(), "nan.npy");
    write_npy_f64(Path::new(&nan), 2, 2, &[0.0, 1.0, f64::NAN, 0.0]);
    let args = with(&nan, &[]);
    bad(
        &args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "flat index 2",
    );
    let args = with(&zfile, &["--n", "4"]);
    bad(
        &args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "holds 5 rows",
    );
}

#[test]
fn readme_sampler_table_is_the_registry() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let begin = readme
        .find("<!-- samplers:begin -->\n")
        .expect("README has the samplers:begin marker");
    let end = readme
        .find("<!-- samplers:end -->")
        .expect("README has the samplers:end marker");
    let copy = &readme[begin + "<!-- samplers:begin -->\n".len()..end];
    assert_eq!(
        copy,
        diffuse::samplers::registry::markdown_table(),
        "README's sampler table differs from the registry: paste `diffuse samplers` between the markers"
    );
    assert_eq!(copy, ok(&["samplers"]));
}

/// A learned model has no exact density: `tolerance` is the a-posteriori estimate of the
/// integration error (a second solve at a tenth of the tolerances), the largest per-point
/// `error_estimate`, and is small at the default tolerances.
#[test]
fn nll_of_a_learned_model_reports_the_estimated_integration_error() {
    let (dir, _) = setup();
    let run = p(dir.path(), "run");
    ok(&[
        "toy",
        "train",
        "--data",
        "8gaussians",
        "--n-data",
        "200",
        "--hidden",
        "16",
        "--layers",
        "2",
        "--embed-dim",
        "8",
        "--batch",
        "32",
        "--steps",
        "30",
        "--out",
        &run,
        "--json",
    ]);
    let points = dir.path().join("pts.npy");
    diffuse::io::write_npy_f32(&points, &[3, 2], &[0.0, 0.0, 2.0, 2.0, -2.8, 0.1]).unwrap();
    let out = p(dir.path(), "nll.json");
    ok(&[
        "toy",
        "nll",
        "--checkpoint",
        &run,
        "--process",
        "vp",
        "--points",
        points.to_str().unwrap(),
        "--out",
        &out,
    ]);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(v["exact_log_likelihood"].is_null());
    assert!(v["tolerance_method"]
        .as_str()
        .unwrap()
        .starts_with("a posteriori"));
    let estimate: Vec<f64> = v["error_estimate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(estimate.len(), 3);
    let tolerance = v["tolerance"].as_f64().unwrap();
    assert_eq!(tolerance, estimate.iter().copied().fold(0.0, f64::max));
    // a float32 network: the integration error at rtol = atol = 1e-6 stays far below 1e-2 nats
    assert!(tolerance.is_finite() && tolerance < 1e-2, "{tolerance}");
    assert_eq!((v["rtol"].as_f64(), v["atol"].as_f64()), (Some(1e-6), Some(1e-6)));
}
