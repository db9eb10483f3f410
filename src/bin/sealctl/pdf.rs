//! `sealctl pdf`: preparing a PDF for a visible seal, and drawing the demo's seal images. The
//! PDF work itself is `sealgate::pdf`; here are the command line and the files.

use anyhow::Context;
use sealgate::pdf::{self, Place};
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum PdfCommand {
    /// Add a signature field showing the seal's image at a place on a page, with room reserved
    /// for the signature (an incremental update: earlier signatures stay valid). Approvers then
    /// approve the prepared file (`token new --pdf`), exactly as it will look.
    Prepare(PrepareArgs),
    /// Draw a red round seal image (PNG), as the demo's seals use.
    DrawSeal {
        /// Pixels on a side.
        #[arg(long, default_value_t = 512)]
        pixels: u32,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// The PDF to stamp.
    pub input: PathBuf,
    /// The seal whose image is shown (its configured image, from the daemon).
    #[arg(long)]
    pub seal: String,
    /// The page, from 1.
    #[arg(long, default_value_t = 1)]
    pub page: u32,
    /// The seal's lower-left corner, in millimetres from the page's lower-left corner: X,Y.
    #[arg(long, value_parser = parse_at)]
    pub at: (f64, f64),
    /// The seal's diameter in millimetres (42 for an official seal, 40 for a contract seal).
    #[arg(long, default_value_t = 40.0)]
    pub size: f64,
    /// Where to write the prepared PDF.
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_at(s: &str) -> Result<(f64, f64), String> {
    let (x, y) = s
        .split_once(',')
        .ok_or_else(|| "write the place as X,Y in millimetres".to_string())?;
    let n = |v: &str| {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .ok_or_else(|| format!("{v:?} is not a non-negative number of millimetres"))
    };
    Ok((n(x)?, n(y)?))
}

pub fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Prepares `args.input` with `image_png`; returns the prepared file's field, place and
/// ByteRange digest.
pub fn prepare(args: &PrepareArgs, image_png: &[u8]) -> anyhow::Result<(pdf::Pending, [u8; 32])> {
    if !(1.0..=200.0).contains(&args.size) {
        anyhow::bail!("--size {} mm: a seal is 1 to 200 mm across", args.size);
    }
    let image = pdf::decode_png(image_png)?;
    let (x, y) = (pdf::points(args.at.0), pdf::points(args.at.1));
    let side = pdf::points(args.size);
    let place = Place {
        page: args.page,
        rect: [x, y, x + side, y + side],
    };
    let input = read(&args.input)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let prepared = pdf::prepare(&input, &args.seal, &image, &place, now)
        .with_context(|| args.input.display().to_string())?;
    let waiting = pdf::pending(&prepared.pdf)?;
    let (sha256, _) = pdf::digests(&prepared.pdf, &waiting.range);
    std::fs::write(&args.out, &prepared.pdf)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok((waiting, sha256))
}

/// What an approval of a prepared PDF names: its ByteRange SHA-256 and SHA-512, and the
/// seal's placement.
pub fn approval_of(
    path: &Path,
) -> anyhow::Result<([u8; 32], [u8; 64], sealgate::token::Placement)> {
    let bytes = read(path)?;
    let waiting = pdf::pending(&bytes).with_context(|| path.display().to_string())?;
    let place = waiting.place.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the waiting signature's widget is on no page",
            path.display()
        )
    })?;
    let (sha256, sha512) = pdf::digests(&bytes, &waiting.range);
    Ok((
        sha256,
        sha512,
        sealgate::token::Placement {
            field: waiting.field,
            page: place.page,
            rect: place.rect,
        },
    ))
}
