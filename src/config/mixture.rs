//! Mixture specs (`gmm:FILE.json`, our own format): a Gaussian mixture as a serde-derived
//! [`MixtureFile`], turned into a [`crate::gmm::Gmm`] by [`crate::gmm::Gmm::from_json`].
//!
//! ```json
//! {"weights": [0.5, 0.5], "means": [[-1, 0], [1, 0]], "stds": [0.3, 0.3], "labels": [0, 1]}
//! ```
//!
//! Unknown fields are errors naming the field (a typo such as `std` must not silently give
//! another mixture). Numbers must be finite (JSON has no infinities; `1e999` is invalid JSON),
//! standard deviations positive with a finite positive square; the mixture's own checks
//! (weights summing to 1, equal dimensions, symmetric positive-definite covariances) are
//! [`crate::gmm::Gmm`]'s.

use serde::Deserialize;

use super::{FieldError, Parsed};
use crate::gmm::Covariance;

/// A mixture spec as written.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureFile {
    /// The component weights pi_k (non-negative, summing to 1 within a tolerance; renormalised).
    pub weights: Vec<f64>,
    /// The component means mu_k, each of the dimension D.
    pub means: Vec<Vec<f64>>,
    /// Full covariances Sigma_k, D x D matrices as lists of rows (or `stds`, not both).
    #[serde(default, deserialize_with = "not_null")]
    pub covariances: Option<Vec<Vec<Vec<f64>>>>,
    /// Isotropic standard deviations sigma_k (Sigma_k = sigma_k^2 I).
    #[serde(default, deserialize_with = "not_null")]
    pub stds: Option<Vec<f64>>,
    /// Class ids per component (every class in 0..max must have a component).
    #[serde(default, deserialize_with = "not_null")]
    pub labels: Option<Vec<usize>>,
}

/// An optional field that, when present, must not be `null` (`"labels": null` is a mistake,
/// not "no labels": leave the field out).
fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A parsed spec: what [`crate::gmm::Gmm`]'s validated construction takes, checked field by field.
#[derive(Clone, Debug, PartialEq)]
pub struct MixtureSpec {
    /// The weights as written.
    pub weights: Vec<f64>,
    /// The means as written.
    pub means: Vec<Vec<f64>>,
    /// One covariance per component (`stds` as isotropic variances; full ones row-major).
    pub covariances: Vec<Covariance>,
    /// The labels, if given.
    pub labels: Option<Vec<usize>>,
}

/// Parses a mixture spec; errors name the field (and index).
pub fn parse(text: &str) -> Result<MixtureSpec, FieldError> {
    let Parsed { value: f, .. } = super::from_str::<MixtureFile>(text)?;
    let covariances = match (f.covariances, f.stds) {
        (Some(_), Some(_)) => {
            return Err(FieldError::at(
                "stds",
                "give either \"covariances\" or \"stds\", not both",
            ))
        }
        (None, None) => {
            return Err(FieldError::at(
                "covariances",
                "missing (give \"covariances\" or \"stds\")",
            ))
        }
        (None, Some(stds)) => {
            if let Some(i) = stds.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(FieldError::at_index(
                    "stds",
                    i,
                    format!("expected a finite number > 0, found {}", stds[i]),
                ));
            }
            // the variance std^2 must be a positive finite number too
            if let Some(i) = stds.iter().position(|s| !(s * s > 0.0 && (s * s).is_finite())) {
                return Err(FieldError::at_index(
                    "stds",
                    i,
                    format!(
                        "{:e}: its square (the variance) is not a positive finite number",
                        stds[i]
                    ),
                ));
            }
            stds.into_iter().map(|s| Covariance::Isotropic(s * s)).collect()
        }
        (Some(covs), None) => {
            let mut out = Vec::with_capacity(covs.len());
            for (i, rows) in covs.into_iter().enumerate() {
                let d = rows.len();
                let mut flat = Vec::with_capacity(d * d);
                for (r, row) in rows.into_iter().enumerate() {
                    if row.len() != d {
                        return Err(FieldError::at_index(
                            "covariances",
                            i,
                            format!("not square: row {r} has {} entries, expected {d}", row.len()),
                        ));
                    }
                    flat.extend(row);
                }
                out.push(Covariance::Full(flat));
            }
            out
        }
    };
    Ok(MixtureSpec {
        weights: f.weights,
        means: f.means,
        covariances,
        labels: f.labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn wrong_types_and_values_name_the_field() {
        assert_eq!(
            err(r#"{"weights": [1], "means": [[0, "a"]], "stds": [1]}"#),
            "field `means[0][1]`: expected a number, found \"a\""
        );
        assert_eq!(
            err(r#"{"weights": 1, "means": [[0]], "stds": [1]}"#),
            "field `weights`: expected a list, found 1"
        );
        assert_eq!(
            err(r#"{"weights": [1], "means": [[0]], "stds": [1], "labels": [-1]}"#),
            "field `labels[0]`: expected a non-negative integer, found -1"
        );
        assert_eq!(
            err(r#"{"weights": [1], "means": [[0]], "stds": [0]}"#),
            "field `stds[0]`: expected a finite number > 0, found 0"
        );
        assert!(err(r#"{"weights": [1], "means": [[0]], "stds": [1e200]}"#)
            .starts_with("field `stds[0]`: 1e200: its square"));
        assert!(err(r#"{"weights": [1], "means": [[0, 1e999]], "stds": [1]}"#).starts_with("invalid JSON"));
        assert_eq!(
            err(r#"{"means": [[0]], "stds": [1]}"#),
            "field `weights`: missing (it is required)"
        );
        assert!(
            err(r#"{"weights": [1], "means": [[0, 0]], "covariances": [[[1, 0], [0]]]}"#)
                .starts_with("field `covariances[0]`: not square")
        );
        // present means not null (the old reader's rule)
        assert_eq!(
            err(r#"{"weights": [1], "means": [[0]], "stds": [1], "labels": null}"#),
            "field `labels`: expected a list, found null"
        );
        assert_eq!(
            err(r#"{"weights": [1], "means": [[0]], "stds": [1], "covariances": null}"#),
            "field `covariances`: expected a list, found null"
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert_eq!(
            err(r#"{"weights": [1], "means": [[0, 0]], "std": [1]}"#),
            "field `std`: unknown field (this file's fields: weights, means, covariances, stds, labels)"
        );
    }

    #[test]
    fn committed_mixture_round_trips() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for rel in [
            "examples/mixtures/anisotropic3.json",
            "tests/fixtures/fast_samplers/narrow3d.json",
        ] {
            let path = root.join(rel);
            let text = std::fs::read_to_string(&path).unwrap();
            let spec = parse(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let want: MixtureFile = serde_json::from_value(v).unwrap();
            assert_eq!(spec.weights, want.weights, "{rel}");
            assert_eq!(spec.means, want.means, "{rel}");
            let k = spec.means.len();
            assert_eq!(spec.covariances.len(), k, "{rel}");
            // what Gmm writes back parses to the same mixture
            let g = crate::gmm::Gmm::from_json(&text, &path).unwrap();
            let back = parse(&g.to_json().to_string()).unwrap();
            assert_eq!(back.means, spec.means, "{rel}");
            assert_eq!(back.covariances, g.covariances(), "{rel}");
        }
    }
}
