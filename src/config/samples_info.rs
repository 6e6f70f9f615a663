//! `info.json`, which `diffuse sample` writes beside `samples.npy` (our own format): how the
//! samples were made, the training data of the model, the classes asked for. `eval samples`
//! reads the training data from it, and with digit features the classes asked for.
//!
//! Every field may be absent (older files lack the newer ones); an unknown field or a field of
//! the wrong type is an error naming the file and the field, never a silent fall-back to other
//! data.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::DataSpec;
use crate::error::{Error, Result};

/// The contents of `info.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplesInfo {
    /// The number of images N.
    pub n: usize,
    /// Their shape `[C, H, W]`.
    pub shape: [usize; 3],
    /// The sampler's name (`ddpm`, `ddim`, `dpmpp-2m`, ...).
    pub sampler: String,
    /// The process it ran on (`ddpm`, `vp`, ...).
    pub process: String,
    /// Sampling steps (null: the sampler's own, e.g. an adaptive ODE solver).
    pub steps: Option<usize>,
    /// The clamp of the predicted x_0, if any.
    pub clip_x0: Option<f64>,
    /// Network evaluations per image.
    pub nfe: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// N / seconds.
    pub images_per_second: f64,
    /// The noise seed.
    pub seed: u64,
    /// The `--init-noise` file the prior draws came from, if any.
    pub init_noise: Option<PathBuf>,
    /// The class each image was asked for (null: unconditional), for a conditional model.
    pub classes: Option<Vec<Option<usize>>>,
    /// The classifier-free guidance scale, for a conditional model.
    pub guidance_scale: Option<f64>,
    /// The model, in words (`runs/demo (step 2588, EMA weights)`).
    pub model: String,
    /// The model's training data, when recorded.
    pub training_data: Option<DataSpec>,
    /// The output directory.
    pub out: PathBuf,
}

impl SamplesInfo {
    /// Parses `info.json` text; errors name `path` and the field.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        super::from_str::<SamplesInfo>(text)
            .map(|p| p.value)
            .map_err(|e| Error::bad_input(path, e.to_string()))
    }

    /// Reads `path`; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8(b).map_err(|_| Error::bad_input(path, "not UTF-8 text"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        Self::from_json(&text, path).map(Some)
    }

    /// The classes asked for, checked against the number of images `n`.
    pub fn classes_for(&self, n: usize, path: &Path) -> Result<Option<&[Option<usize>]>> {
        match &self.classes {
            None => Ok(None),
            Some(c) if c.len() != n => Err(Error::bad_input(
                path,
                format!(
                    "field `classes`: expected {n} entries (one per image), found {}",
                    c.len()
                ),
            )),
            Some(c) => Ok(Some(c)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        SamplesInfo::from_json(text, Path::new("gen/info.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn wrong_types_and_unknown_fields_name_the_field() {
        assert_eq!(
            err(r#"{"classes": [0, "x"]}"#),
            "gen/info.json: field `classes[1]`: expected a non-negative integer, found \"x\""
        );
        assert_eq!(
            err(r#"{"training_data": {"data": "mnist5k", "split": "val"}}"#)
                .split(", found")
                .next()
                .unwrap(),
            "gen/info.json: field `training_data.split`: expected one of train, test"
        );
        assert!(err(r#"{"n": 4, "sampler_name": "ddim"}"#).starts_with(
            "gen/info.json: field `sampler_name`: unknown field (this file's fields: n, shape,"
        ));
        assert!(err(r#"{"training_data": "#).starts_with("gen/info.json: invalid JSON"));
        assert!(err("[]").starts_with("gen/info.json: expected an object, found a list"));
    }

    #[test]
    fn what_sample_writes_round_trips() {
        let info = SamplesInfo {
            n: 2,
            shape: [1, 28, 28],
            sampler: "ddim".into(),
            process: "ddpm".into(),
            steps: Some(10),
            clip_x0: Some(1.0),
            nfe: 10,
            seconds: 0.5,
            images_per_second: 4.0,
            seed: 7,
            init_noise: None,
            classes: Some(vec![Some(3), None]),
            guidance_scale: Some(2.0),
            model: "runs/demo (step 10, EMA weights)".into(),
            training_data: Some(DataSpec::default()),
            out: "runs/demo/generated".into(),
        };
        let text = serde_json::to_string_pretty(&info).unwrap();
        let back = SamplesInfo::from_json(&text, Path::new("info.json")).unwrap();
        assert_eq!(back, info);
        assert_eq!(
            back.classes_for(2, Path::new("info.json")).unwrap().unwrap(),
            &[Some(3), None]
        );
        assert!(back.classes_for(3, Path::new("info.json")).is_err());
        // an older file with fewer fields still reads
        let old = r#"{"n": 64, "shape": [1, 28, 28], "sampler": "ddpm", "model": "m",
                      "training_data": {"data": "mnist5k", "format": null, "split": "train", "image_size": null, "channels": null}}"#;
        let old = SamplesInfo::from_json(old, Path::new("info.json")).unwrap();
        assert_eq!(old.training_data, Some(DataSpec::default()));
    }
}
