//! The bundled digit classifier (assets/digit_classifier.safetensors) classifies the bundled
//! test digits at the accuracy its provenance file states, and `eval samples` reports its
//! figures (digit-feature FD, class histogram, agreement with the classes in info.json).

use candle_core::Device;
use diffuse::data::{load_bundled, Split};
use diffuse::eval::digits::DigitClassifier;

#[test]
fn bundled_weights_classify_the_bundled_test_digits() {
    let test = load_bundled(Split::Test).unwrap();
    let values: Vec<f64> = test.pixels().iter().map(|&v| (v as f64 + 1.0) / 2.0).collect();
    let net = DigitClassifier::bundled(&Device::Cpu).unwrap();
    let (features, classes) = net.describe(&values, test.shape(), &Device::Cpu).unwrap();
    assert_eq!(features.len(), test.len() * 128);
    let labels = test.labels().unwrap();
    let hits = classes
        .iter()
        .zip(labels)
        .filter(|(c, l)| **c as u32 == **l)
        .count();
    let acc = hits as f64 / test.len() as f64;
    assert!(acc >= 0.97, "test accuracy {acc}");
    // 16x16 inputs go through the resize and still classify
    let small = test.clone().resized(16).unwrap();
    let values: Vec<f64> = small.pixels().iter().map(|&v| (v as f64 + 1.0) / 2.0).collect();
    let (_, classes) = net.describe(&values, small.shape(), &Device::Cpu).unwrap();
    let hits = classes
        .iter()
        .zip(labels)
        .filter(|(c, l)| **c as u32 == **l)
        .count();
    assert!(
        hits as f64 / test.len() as f64 >= 0.85,
        "16x16 accuracy {hits}/1000"
    );
}
