//! Low-dimensional toy datasets: the standard 2-D benchmarks, and points from `.npy` or CSV.
//!
//! The synthetic sets follow FFJORD's `toy_data.py` (Grathwohl et al. 2019), the usual
//! reference for these pictures, so their scale (roughly [-4, 4]^2) matches published plots:
//!
//! ```text
//! 8gaussians    centre c_k = 4 * (cos(k pi / 4), sin(k pi / 4)), k uniform in 0..8;
//!               x = (c_k + 0.5 * z) / 1.414,  z ~ N(0, I)            (FFJORD's literal 1.414)
//! moons         half the points on the upper arc (cos th, sin th), half on the lower arc
//!               (1 - cos th, 1 - sin th - 0.5), th ~ U[0, pi); + 0.1 * z; then 2 * p + (-1, -0.2)
//!               (scikit-learn's make_moons with noise 0.1, which spaces th evenly instead)
//! swissroll     t = 1.5 pi (1 + 2u), u ~ U[0, 1); (t cos t, t sin t) + z; then / 5
//!               (scikit-learn's make_swiss_roll with noise 1, the x and z coordinates)
//! checkerboard  x1 ~ U[-2, 2); x2 = U[0, 1) - 2b + (floor(x1) mod 2), b ~ Bernoulli(1/2);
//!               then 2 * (x1, x2): 8 squares of side 2 in a checkerboard on [-4, 4]^2
//! rings         four concentric circles of radii 3, 2.25, 1.5, 0.75 (FFJORD: 1, 0.75, 0.5,
//!               0.25 times 3), a quarter of the points each, angle ~ U[0, 2 pi); + 0.08 * z
//! ```
//!
//! Every draw comes from the [`Rng`] the caller seeds; the points are shuffled, so any prefix is
//! a fair sample.
//!
//! `--data` specs ([`DataSpec::parse`]): `moons`, `8gaussians`, `swissroll`, `checkerboard`,
//! `rings`, `npy:FILE` (a float32/float64 array of shape [N, D]), `csv:FILE` (one point per line,
//! values separated by commas or spaces, an optional header line, `#` comments), and
//! `gmm:FILE.json` (a Gaussian mixture; see [`DataSpec::Gmm`]).

use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// `n` points of dimension `dim`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Points {
    dim: usize,
    data: Vec<f64>,
}

impl Points {
    /// Points from row-major `data` (`data.len()` a multiple of `dim >= 1`, all finite).
    pub fn new(dim: usize, data: Vec<f64>) -> Result<Self> {
        if dim == 0 || data.len() % dim != 0 {
            return Err(Error::param(
                "points",
                format!("{} values cannot be split into rows of {dim}", data.len()),
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::param(
                "points",
                format!("row {} holds a non-finite value", i / dim),
            ));
        }
        Ok(Points { dim, data })
    }

    /// The dimension D.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of points N.
    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }

    /// True when there are no points.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Point `i` (panics if `i >= len()`, like slice indexing).
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// All values, row-major.
    pub fn as_slice(&self) -> &[f64] {
        &self.data
    }

    /// An f32 tensor of shape [N, D].
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, (self.len(), self.dim), device)?)
    }

    /// Per-coordinate mean and standard deviation (population).
    pub fn mean_std(&self) -> (Vec<f64>, Vec<f64>) {
        let n = self.len().max(1) as f64;
        let mut mean = vec![0.0; self.dim];
        for r in self.data.chunks_exact(self.dim) {
            for (m, x) in mean.iter_mut().zip(r) {
                *m += x / n;
            }
        }
        let mut var = vec![0.0; self.dim];
        for r in self.data.chunks_exact(self.dim) {
            for ((v, x), m) in var.iter_mut().zip(r).zip(&mean) {
                *v += (x - m).powi(2) / n;
            }
        }
        (mean, var.into_iter().map(f64::sqrt).collect())
    }

    fn shuffled_rows(self, rng: &mut Rng) -> Self {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        rng.shuffle(&mut idx);
        let data = idx.iter().flat_map(|&i| self.row(i).to_vec()).collect();
        Points { dim: self.dim, data }
    }
}

/// The synthetic 2-D distributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toy2d {
    /// Eight Gaussians on a ring.
    EightGaussians,
    /// Two interleaved half circles.
    Moons,
    /// A 2-D swiss roll spiral.
    SwissRoll,
    /// A checkerboard of 8 uniform squares.
    Checkerboard,
    /// Four concentric noisy circles.
    Rings,
}

impl Toy2d {
    /// Every synthetic set.
    pub const ALL: [Toy2d; 5] = [
        Toy2d::EightGaussians,
        Toy2d::Moons,
        Toy2d::SwissRoll,
        Toy2d::Checkerboard,
        Toy2d::Rings,
    ];

    /// The `--data` name.
    pub fn name(&self) -> &'static str {
        match self {
            Toy2d::EightGaussians => "8gaussians",
            Toy2d::Moons => "moons",
            Toy2d::SwissRoll => "swissroll",
            Toy2d::Checkerboard => "checkerboard",
            Toy2d::Rings => "rings",
        }
    }

    /// `n` points drawn with `rng` (shuffled).
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Points {
        let mut data = Vec::with_capacity(2 * n);
        match self {
            Toy2d::EightGaussians => {
                let s = std::f64::consts::FRAC_1_SQRT_2;
                let centres = [
                    (1.0, 0.0),
                    (-1.0, 0.0),
                    (0.0, 1.0),
                    (0.0, -1.0),
                    (s, s),
                    (s, -s),
                    (-s, s),
                    (-s, -s),
                ];
                for _ in 0..n {
                    let (cx, cy) = centres[rng.below(8) as usize];
                    let x = (4.0 * cx + 0.5 * rng.normal()) / 1.414;
                    let y = (4.0 * cy + 0.5 * rng.normal()) / 1.414;
                    data.extend([x, y]);
                }
            }
            Toy2d::Moons => {
                let n_outer = n / 2;
                for i in 0..n {
                    let th = PI * rng.uniform();
                    let (x, y) = if i < n_outer {
                        (th.cos(), th.sin())
                    } else {
                        (1.0 - th.cos(), 1.0 - th.sin() - 0.5)
                    };
                    let (x, y) = (x + 0.1 * rng.normal(), y + 0.1 * rng.normal());
                    data.extend([2.0 * x - 1.0, 2.0 * y - 0.2]);
                }
            }
            Toy2d::SwissRoll => {
                for _ in 0..n {
                    let t = 1.5 * PI * (1.0 + 2.0 * rng.uniform());
                    let x = t * t.cos() + rng.normal();
                    let z = t * t.sin() + rng.normal();
                    data.extend([x / 5.0, z / 5.0]);
                }
            }
            Toy2d::Checkerboard => {
                for _ in 0..n {
                    let x1 = 4.0 * rng.uniform() - 2.0;
                    let x2 = rng.uniform() - 2.0 * rng.below(2) as f64 + x1.floor().rem_euclid(2.0);
                    data.extend([2.0 * x1, 2.0 * x2]);
                }
            }
            Toy2d::Rings => {
                let radii = [3.0, 2.25, 1.5, 0.75];
                for i in 0..n {
                    let r = radii[(i * 4 / n.max(1)).min(3)];
                    let a = 2.0 * PI * rng.uniform();
                    data.extend([
                        r * a.cos() + 0.08 * rng.normal(),
                        r * a.sin() + 0.08 * rng.normal(),
                    ]);
                }
            }
        }
        // every value is finite by construction
        Points { dim: 2, data }.shuffled_rows(rng)
    }
}

/// What `--data` names.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSpec {
    /// A synthetic 2-D set.
    Synthetic(Toy2d),
    /// Points from a `.npy` file, shape [N, D].
    Npy(PathBuf),
    /// Points from a CSV file.
    Csv(PathBuf),
    /// `n` exact draws from a Gaussian mixture given as JSON (see [`crate::gmm::Gmm`]).
    Gmm(PathBuf),
}

/// The names [`DataSpec::parse`] accepts, for error messages and `--help`.
pub const SPEC_HELP: &str =
    "moons, 8gaussians, swissroll, checkerboard, rings, npy:FILE, csv:FILE, gmm:FILE.json";

impl DataSpec {
    /// Parses a `--data` value.
    pub fn parse(spec: &str) -> Result<Self> {
        let file = |rest: &str, kind: &str| -> Result<PathBuf> {
            if rest.is_empty() {
                Err(Error::param(
                    "data",
                    format!("'{spec}' names no file; expected {kind}:FILE"),
                ))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        if let Some(rest) = spec.strip_prefix("npy:") {
            return Ok(DataSpec::Npy(file(rest, "npy")?));
        }
        if let Some(rest) = spec.strip_prefix("csv:") {
            return Ok(DataSpec::Csv(file(rest, "csv")?));
        }
        if let Some(rest) = spec.strip_prefix("gmm:") {
            return Ok(DataSpec::Gmm(file(rest, "gmm")?));
        }
        let toy = match spec.to_ascii_lowercase().as_str() {
            "8gaussians" | "8-gaussians" | "eight-gaussians" => Toy2d::EightGaussians,
            "moons" | "two-moons" => Toy2d::Moons,
            "swissroll" | "swiss-roll" => Toy2d::SwissRoll,
            "checkerboard" => Toy2d::Checkerboard,
            "rings" | "concentric-rings" => Toy2d::Rings,
            _ => {
                return Err(Error::param(
                    "data",
                    format!("unknown dataset '{spec}'; expected one of {SPEC_HELP}"),
                ))
            }
        };
        Ok(DataSpec::Synthetic(toy))
    }

    /// Whether the points come from a file (their number is the file's).
    pub fn is_file(&self) -> bool {
        matches!(self, DataSpec::Npy(_) | DataSpec::Csv(_))
    }

    /// The points: `n` draws seeded by `seed` for synthetic sets (and mixtures), the file's
    /// points for `npy:` and `csv:` (then `n` is ignored).
    pub fn load(&self, n: usize, seed: u64) -> Result<Points> {
        match self {
            DataSpec::Synthetic(t) => {
                if n == 0 {
                    return Err(Error::param("n-data", "got 0, expected at least 1 point"));
                }
                Ok(t.sample(n, &mut Rng::new(seed)))
            }
            DataSpec::Npy(p) => read_npy_points(p),
            DataSpec::Csv(p) => read_csv_points(p),
            DataSpec::Gmm(p) => {
                if n == 0 {
                    return Err(Error::param("n-data", "got 0, expected at least 1 point"));
                }
                let gmm = crate::gmm::Gmm::from_json_file(p)?;
                Points::new(gmm.dim(), gmm.sample(n, seed))
            }
        }
    }
}

impl std::str::FromStr for DataSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DataSpec::parse(s)
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Synthetic(t) => f.write_str(t.name()),
            DataSpec::Npy(p) => write!(f, "npy:{}", p.display()),
            DataSpec::Csv(p) => write!(f, "csv:{}", p.display()),
            DataSpec::Gmm(p) => write!(f, "gmm:{}", p.display()),
        }
    }
}

/// Points from a `.npy` array of shape [N, D] (float32 or float64), N, D >= 1, all finite.
pub fn read_npy_points(path: &Path) -> Result<Points> {
    let a = crate::io::read_npy(path)?;
    let (n, d) = match a.shape.as_slice() {
        [n, d] => (*n, *d),
        s => {
            return Err(Error::bad_input(
                path,
                format!("expected a 2-D array of shape [N, D], got shape {s:?}"),
            ))
        }
    };
    if n == 0 || d == 0 {
        return Err(Error::bad_input(
            path,
            format!("the array is empty (shape [{n}, {d}])"),
        ));
    }
    if let Some(i) = a.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::bad_input(
            path,
            format!(
                "row {}, column {} is {} (values must be finite)",
                i / d,
                i % d,
                a.data[i]
            ),
        ));
    }
    Ok(Points { dim: d, data: a.data })
}

/// Points from a CSV file: one point per line, values separated by commas (or by spaces/tabs
/// when a line has no comma). Blank lines and lines starting with `#` are skipped; a first line
/// that is not all numbers is taken as a header. Every row needs the first row's number of
/// values. Errors give the line (and column) number.
pub fn read_csv_points(path: &Path) -> Result<Points> {
    let text = crate::io::read_text(path)?;
    let mut dim: Option<(usize, usize)> = None; // (values per row, line of the first row)
    let mut data = Vec::new();
    let mut seen_content = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = if line.contains(',') {
            line.split(',').map(str::trim).collect()
        } else {
            line.split_whitespace().collect()
        };
        let parsed: Vec<std::result::Result<f64, usize>> = fields
            .iter()
            .enumerate()
            .map(|(c, f)| f.parse::<f64>().map_err(|_| c))
            .collect();
        let first_content = !seen_content;
        seen_content = true;
        if first_content && parsed.iter().any(|p| p.is_err()) {
            continue; // a header line
        }
        let mut row = Vec::with_capacity(fields.len());
        for (c, p) in parsed.into_iter().enumerate() {
            match p {
                Ok(v) if v.is_finite() => row.push(v),
                Ok(v) => {
                    return Err(Error::bad_input(
                        path,
                        format!("line {line_no}, column {}: {v} is not a finite number", c + 1),
                    ))
                }
                Err(_) => {
                    return Err(Error::bad_input(
                        path,
                        format!(
                            "line {line_no}, column {}: '{}' is not a number",
                            c + 1,
                            fields[c]
                        ),
                    ))
                }
            }
        }
        match dim {
            None => dim = Some((row.len(), line_no)),
            Some((d, first)) if d != row.len() => {
                return Err(Error::bad_input(
                    path,
                    format!(
                        "line {line_no}: {} values, expected {d} like the first data row (line {first})",
                        row.len()
                    ),
                ))
            }
            Some(_) => {}
        }
        data.extend(row);
    }
    match dim {
        Some((d, _)) => Ok(Points { dim: d, data }),
        None => Err(Error::bad_input(path, "no data rows")),
    }
}

/// The class labels of the points of `spec` (`n` points drawn with `seed`, as
/// [`DataSpec::load`]): for a mixture with `labels`, the class of the component each draw came
/// from; for `npy:`/`csv:` points, the `labels` file (one integer class id per point); `None`
/// for unlabelled data. Errors: a labels file for synthetic data or a mixture, a count that
/// differs from the points, a value that is not a class id.
pub fn load_labels(
    spec: &DataSpec,
    n: usize,
    seed: u64,
    labels: Option<&Path>,
    n_points: usize,
) -> Result<Option<Vec<usize>>> {
    match (spec, labels) {
        (DataSpec::Npy(_) | DataSpec::Csv(_), Some(file)) => {
            let l = read_labels(file)?;
            if l.len() != n_points {
                return Err(Error::bad_input(
                    file,
                    format!("holds {} labels, the data {spec} has {n_points} points (one label per point)", l.len()),
                ));
            }
            Ok(Some(l))
        }
        (_, Some(file)) => Err(Error::param(
            "labels",
            format!(
                "--labels {} applies to npy:/csv: points; {spec} brings its own labels (a mixture's \"labels\") or none",
                file.display()
            ),
        )),
        (DataSpec::Gmm(p), None) => {
            let gmm = crate::gmm::Gmm::from_json_file(p)?;
            Ok(gmm.has_labels().then(|| gmm.sample_labelled(n, seed).1))
        }
        (_, None) => Ok(None),
    }
}

/// Class ids from a file: a `.npy` of integer-valued floats, or text with one integer per line
/// (commas and whitespace also separate). Every id must be a non-negative integer.
pub fn read_labels(path: &Path) -> Result<Vec<usize>> {
    let values: Vec<f64> = if path.extension().is_some_and(|e| e == "npy") {
        let a = crate::io::read_npy(path)?;
        if a.shape.len() != 1 && !(a.shape.len() == 2 && a.shape[1] == 1) {
            return Err(Error::bad_input(
                path,
                format!("labels must be a vector [N] (or [N, 1]), got shape {:?}", a.shape),
            ));
        }
        a.data
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        text.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, s)| {
                s.parse::<f64>().map_err(|_| {
                    Error::bad_input(path, format!("label {i} is '{s}', expected an integer class id"))
                })
            })
            .collect::<Result<_>>()?
    };
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 1e9 {
                Ok(v as usize)
            } else {
                Err(Error::bad_input(
                    path,
                    format!("label {i} is {v}, expected an integer class id >= 0"),
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_of(p: &Points, f: impl Fn(&[f64]) -> f64) -> f64 {
        (0..p.len()).map(|i| f(p.row(i))).sum::<f64>() / p.len() as f64
    }

    #[test]
    fn synthetic_sets_have_their_defining_statistics() {
        let n = 20_000;
        // 8 Gaussians: radius of the centres 4 / 1.414 = 2.8289; E|x - c|^2 = 2 * (0.5/1.414)^2.
        let p = Toy2d::EightGaussians.sample(n, &mut Rng::new(1));
        assert_eq!((p.len(), p.dim()), (n, 2));
        let r = mean_of(&p, |x| x[0].hypot(x[1]));
        // E|c + e| for |c| = 2.8289, e ~ N(0, 0.3536^2 I): about |c| + sigma^2 / (2|c|) = 2.851;
        // the sample mean of n = 20k has standard error ~0.0025; allow 0.01.
        assert!((r - 2.851).abs() < 0.01, "8gaussians mean radius {r}");
        // moons: mean of the two arcs. Upper arc mean (0, 2/pi), lower (1, 0.5 - 2/pi); their
        // average (0.5, 0.25) maps to 2 * (0.5, 0.25) + (-1, -0.2) = (0, 0.3).
        let p = Toy2d::Moons.sample(n, &mut Rng::new(2));
        let (mean, _) = p.mean_std();
        // per-coordinate spread ~1.2 / sqrt(20000) = 0.009; allow 0.03
        assert!(
            mean[0].abs() < 0.03 && (mean[1] - 0.3).abs() < 0.03,
            "moons mean {mean:?}"
        );
        // checkerboard: every point lies in a square where floor(x1/2) + floor(x2/2) is even
        // (x1/2 in [-2, 2), x2/2 - floor(x1/2) mod 2 in [0, 1) or [-2, -1)), within [-4, 4]^2
        let p = Toy2d::Checkerboard.sample(n, &mut Rng::new(3));
        for i in 0..p.len() {
            let (a, b) = (p.row(i)[0] / 2.0, p.row(i)[1] / 2.0);
            assert!((-2.0..2.0).contains(&a) && (-2.0..2.0).contains(&b), "{a} {b}");
            assert_eq!(
                (a.floor() + b.floor()).rem_euclid(2.0),
                0.0,
                "({a}, {b}) on a white square"
            );
        }
        // rings: a quarter of the points within 0.4 of each radius (noise sd 0.08: 5 sd)
        let p = Toy2d::Rings.sample(n, &mut Rng::new(4));
        for r0 in [3.0, 2.25, 1.5, 0.75] {
            let frac = mean_of(&p, |x| ((x[0].hypot(x[1]) - r0).abs() < 0.3) as u8 as f64);
            assert!((frac - 0.25).abs() < 0.01, "ring {r0}: {frac}");
        }
        // swiss roll: t in [1.5 pi, 4.5 pi], radius t / 5 in [0.94, 2.83] before noise (sd 0.2)
        let p = Toy2d::SwissRoll.sample(n, &mut Rng::new(5));
        let r = mean_of(&p, |x| x[0].hypot(x[1]));
        // E[t]/5 = 3 pi / 5 = 1.885 plus a small noise bias (E|v + e| > |v|: + sd^2 / (2 r) ~ 0.01)
        assert!((r - 1.895).abs() < 0.02, "swiss roll mean radius {r}");
    }

    #[test]
    fn same_seed_same_points() {
        for t in Toy2d::ALL {
            assert_eq!(t.sample(50, &mut Rng::new(9)), t.sample(50, &mut Rng::new(9)));
            assert_ne!(t.sample(50, &mut Rng::new(9)), t.sample(50, &mut Rng::new(10)));
        }
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(
            DataSpec::parse("moons").unwrap(),
            DataSpec::Synthetic(Toy2d::Moons)
        );
        assert_eq!(
            DataSpec::parse("8gaussians").unwrap(),
            DataSpec::Synthetic(Toy2d::EightGaussians)
        );
        assert_eq!(
            DataSpec::parse("npy:a/b.npy").unwrap(),
            DataSpec::Npy("a/b.npy".into())
        );
        assert_eq!(DataSpec::parse("csv:x.csv").unwrap().to_string(), "csv:x.csv");
        assert_eq!(
            DataSpec::parse("gmm:m.json").unwrap(),
            DataSpec::Gmm("m.json".into())
        );
        for t in Toy2d::ALL {
            assert_eq!(DataSpec::parse(t.name()).unwrap(), DataSpec::Synthetic(t));
        }
        let e = DataSpec::parse("spiral").unwrap_err().to_string();
        assert!(
            e.contains("unknown dataset 'spiral'") && e.contains("checkerboard"),
            "{e}"
        );
        assert!(DataSpec::parse("npy:").is_err());
        // a missing mixture file is an error naming the file
        let e = DataSpec::parse("gmm:/nonexistent/m.json")
            .unwrap()
            .load(10, 0)
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/m.json"), "{e}");
    }

    #[test]
    fn csv_reading_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pts.csv");
        std::fs::write(&p, "x,y\n# comment\n1.5, -2\n\n3,4e-1\n").unwrap();
        let pts = read_csv_points(&p).unwrap();
        assert_eq!((pts.len(), pts.dim()), (2, 2));
        assert_eq!(pts.as_slice(), &[1.5, -2.0, 3.0, 0.4]);
        std::fs::write(&p, "1 2 3\n4 5 6\n").unwrap();
        assert_eq!(read_csv_points(&p).unwrap().dim(), 3);
        std::fs::write(&p, "x,y\n1,2\n3,abc\n").unwrap();
        let e = read_csv_points(&p).unwrap_err().to_string();
        assert!(
            e.contains("line 3, column 2: 'abc' is not a number") && e.contains("pts.csv"),
            "{e}"
        );
        std::fs::write(&p, "1,2\n3,4,5\n").unwrap();
        let e = read_csv_points(&p).unwrap_err().to_string();
        assert!(
            e.contains("line 2: 3 values, expected 2 like the first data row (line 1)"),
            "{e}"
        );
        std::fs::write(&p, "1,2\n3,inf\n").unwrap();
        assert!(read_csv_points(&p)
            .unwrap_err()
            .to_string()
            .contains("line 2, column 2"));
        std::fs::write(&p, "x,y\n").unwrap();
        assert!(read_csv_points(&p)
            .unwrap_err()
            .to_string()
            .contains("no data rows"));
        let e = read_csv_points(&dir.path().join("missing.csv")).unwrap_err();
        assert!(e.is_user_error() && e.to_string().contains("missing.csv"));
    }

    #[test]
    fn npy_reading_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pts.npy");
        crate::io::write_npy_f32(&p, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let pts = DataSpec::parse(&format!("npy:{}", p.display()))
            .unwrap()
            .load(0, 0)
            .unwrap();
        assert_eq!((pts.len(), pts.dim()), (3, 2));
        assert_eq!(pts.row(2), &[5.0, 6.0]);
        crate::io::write_npy_f32(&p, &[6], &[1.0; 6]).unwrap();
        assert!(read_npy_points(&p)
            .unwrap_err()
            .to_string()
            .contains("expected a 2-D array"));
        crate::io::write_npy_f32(&p, &[2, 2], &[1.0, 2.0, f32::NAN, 4.0]).unwrap();
        let e = read_npy_points(&p).unwrap_err().to_string();
        assert!(e.contains("row 1, column 0 is NaN"), "{e}");
    }
}
