//! Flags shared by several commands.

use clap::Args;

use diffuse::data::{DataSpec, Format, Split};

/// Which images to use: `--data`, `--format`, `--split`, `--image-size`, `--channels`.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// `mnist5k` (the bundled 5,000-image MNIST subset) or a directory: IDX files
    /// (MNIST/Fashion-MNIST), CIFAR-10 `.bin` batches, or a folder of PNG/JPEG images (detected).
    #[arg(long, default_value = "mnist5k")]
    pub data: String,
    /// Override format detection: idx, cifar10 or folder.
    #[arg(long)]
    pub format: Option<Format>,
    /// Resize (shorter side) and centre-crop every image to this size (e.g. 16 for 16x16).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Convert images to 1 (grey) or 3 (RGB) channels (default: the source's own).
    #[arg(long)]
    pub channels: Option<usize>,
}

impl DataArgs {
    /// The dataset selection for `split`.
    pub fn spec(&self, split: Split) -> DataSpec {
        DataSpec {
            data: self.data.clone(),
            format: self.format,
            split,
            image_size: self.image_size,
            channels: self.channels,
        }
    }
}
