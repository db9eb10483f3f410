//! PDF signatures with a visible seal (PAdES B-B, ETSI EN 319 142-1), for `sealctl` only: the
//! daemon never parses a PDF, it signs the digest an approval names.
//!
//! Owns: preparing a PDF for a seal (an incremental update with a signature field, a widget
//! whose appearance is the seal's image, and a zeroed `/Contents` reserved for the CMS); the
//! digest of a prepared PDF's ByteRange, which is what approvers approve; embedding the
//! daemon's CMS into the reserved room; reading every signature of a PDF back, with what
//! changed after each.
//! Never: signs, or accepts a ByteRange that leaves any byte of the file unsigned but the
//! `/Contents` string. Parsing and writing are `lopdf`'s; the seal image is decoded by `png`.

use lopdf::{Dictionary, Document, IncrementalDocument, Object, ObjectId, Stream, StringFormat};
use sha2::{Digest, Sha256, Sha512};

/// Bytes reserved for the CMS in a prepared PDF: signature, certificate chain and a timestamp
/// token fit with room to spare.
pub const RESERVED_BYTES: usize = 16 * 1024;
/// The largest seal image accepted, as a file.
pub const MAX_IMAGE_BYTES: usize = 1024 * 1024;
/// The largest seal image accepted, in pixels on a side.
pub const MAX_IMAGE_SIDE: u32 = 2048;
/// The placeholder of each ByteRange number until the file's length is known: ten digits, as
/// many as the largest offset written back.
const BYTE_RANGE_PLACEHOLDER: i64 = 9_999_999_999;

#[derive(Debug, thiserror::Error)]
pub enum PdfError {
    #[error("not a PDF that can be read: {0}")]
    Parse(String),
    #[error("the PDF is encrypted; sealgate stamps unencrypted PDFs only")]
    Encrypted,
    #[error("the PDF has {pages} page(s); there is no page {page}")]
    NoPage { page: u32, pages: usize },
    #[error("the seal's rectangle {rect:?} (points) is not inside page {page}'s box {media:?}")]
    OffPage {
        page: u32,
        rect: [i64; 4],
        media: [f64; 4],
    },
    #[error("the seal image is not usable: {0}")]
    Image(String),
    #[error(
        "the PDF has no signature waiting for its CMS (prepare it with `sealctl pdf prepare`)"
    )]
    NothingReserved,
    #[error("the PDF has {0} signatures waiting for their CMS; one is expected")]
    SeveralReserved(usize),
    #[error("the signature's ByteRange is not sound: {0}")]
    ByteRange(String),
    #[error("the CMS is {need} bytes but the PDF reserves {room}")]
    NoRoom { need: usize, room: usize },
    #[error("cannot write the PDF: {0}")]
    Write(String),
}

fn parse_err(e: impl std::fmt::Display) -> PdfError {
    PdfError::Parse(e.to_string())
}

/// A seal image, decoded: 8-bit RGB and, when the PNG has one, an 8-bit alpha channel.
pub struct SealImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    pub alpha: Option<Vec<u8>>,
}

/// Decodes a PNG seal image (any colour type, 8 or 16 bits, palette expanded), at most
/// [`MAX_IMAGE_BYTES`] and [`MAX_IMAGE_SIDE`] pixels on a side.
pub fn decode_png(bytes: &[u8]) -> Result<SealImage, PdfError> {
    let bad = |m: String| PdfError::Image(m);
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(bad(format!(
            "{} bytes; at most {MAX_IMAGE_BYTES}",
            bytes.len()
        )));
    }
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let (width, height) = (reader.info().width, reader.info().height);
    if width == 0 || height == 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(bad(format!(
            "{width}x{height} pixels; at most {MAX_IMAGE_SIDE} on a side"
        )));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad("too large".into()))?;
    let mut buf = vec![0; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(e.to_string()))?;
    let pixels = &buf[..frame.buffer_size()];
    let n = (width * height) as usize;
    let (mut rgb, mut alpha) = (Vec::with_capacity(n * 3), Vec::with_capacity(n));
    let channels = frame.color_type.samples();
    if frame.bit_depth != png::BitDepth::Eight || pixels.len() != n * channels {
        return Err(bad("not an 8-bit image after expansion".into()));
    }
    for px in pixels.chunks_exact(channels) {
        match px {
            [g] => rgb.extend([*g, *g, *g]),
            [g, a] => {
                rgb.extend([*g, *g, *g]);
                alpha.push(*a);
            }
            [r, g, b] => rgb.extend([*r, *g, *b]),
            [r, g, b, a] => {
                rgb.extend([*r, *g, *b]);
                alpha.push(*a);
            }
            _ => return Err(bad("unexpected pixel layout".into())),
        }
    }
    Ok(SealImage {
        width,
        height,
        rgb,
        alpha: (!alpha.is_empty()).then_some(alpha),
    })
}

/// Draws a round seal as seal makers cut them, `side` pixels square, in seal red on a
/// transparent ground: an outer ring, a thin inner ring and a five-pointed star. The demo's
/// seal images are drawn by this.
pub fn draw_round_seal(side: u32) -> Result<Vec<u8>, PdfError> {
    let side = side.clamp(64, MAX_IMAGE_SIDE);
    let c = side as f64 / 2.0;
    let r = c * 0.98;
    // The star's ten corners, point up.
    let star: Vec<(f64, f64)> = (0..10)
        .map(|i| {
            let radius = if i % 2 == 0 { 0.42 * r } else { 0.17 * r };
            let a = std::f64::consts::FRAC_PI_2 + i as f64 * std::f64::consts::PI / 5.0;
            (c + radius * a.cos(), c - radius * a.sin())
        })
        .collect();
    let inside_star = |x: f64, y: f64| {
        let mut inside = false;
        let mut j = star.len() - 1;
        for i in 0..star.len() {
            let ((xi, yi), (xj, yj)) = (star[i], star[j]);
            if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                inside = !inside;
            }
            j = i;
        }
        inside
    };
    let ink = |x: f64, y: f64| {
        let d = ((x - c).powi(2) + (y - c).powi(2)).sqrt();
        (0.88 * r..=r).contains(&d) || (0.80 * r..=0.82 * r).contains(&d) || inside_star(x, y)
    };
    let mut rgba = Vec::with_capacity((side * side * 4) as usize);
    for y in 0..side {
        for x in 0..side {
            // Four samples a pixel, for smooth edges.
            let covered = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
                .iter()
                .filter(|(dx, dy)| ink(x as f64 + dx, y as f64 + dy))
                .count();
            rgba.extend([0xd7, 0x26, 0x1e, (covered * 255 / 4) as u8]);
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, side, side);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| PdfError::Image(e.to_string()))?;
        writer
            .write_image_data(&rgba)
            .map_err(|e| PdfError::Image(e.to_string()))?;
    }
    Ok(out)
}

/// Where a visible seal goes: the page (from 1) and the widget's rectangle in points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub page: u32,
    pub rect: [i64; 4],
}

/// Points from millimetres, rounded.
pub fn points(mm: f64) -> i64 {
    (mm * 72.0 / 25.4).round() as i64
}

fn load(pdf: &[u8]) -> Result<Document, PdfError> {
    let doc = Document::load_mem(pdf).map_err(parse_err)?;
    if doc.trailer.has(b"Encrypt") || doc.is_encrypted() {
        return Err(PdfError::Encrypted);
    }
    Ok(doc)
}

fn number(o: &Object) -> Option<f64> {
    match o {
        Object::Integer(i) => Some(*i as f64),
        Object::Real(r) => Some(*r as f64),
        _ => None,
    }
}

/// A page's box: its MediaBox, or the nearest ancestor's.
fn media_box(doc: &Document, page: ObjectId) -> Result<[f64; 4], PdfError> {
    let mut id = page;
    for _ in 0..64 {
        let dict = doc.get_dictionary(id).map_err(parse_err)?;
        if let Ok(b) = dict.get_deref(b"MediaBox", doc).and_then(|o| o.as_array()) {
            let v: Vec<f64> = b.iter().filter_map(number).collect();
            if let [x1, y1, x2, y2] = v[..] {
                return Ok([x1.min(x2), y1.min(y2), x1.max(x2), y1.max(y2)]);
            }
            return Err(PdfError::Parse(
                "a MediaBox that is not four numbers".into(),
            ));
        }
        match dict.get(b"Parent").and_then(|p| p.as_reference()) {
            Ok(parent) => id = parent,
            Err(_) => break,
        }
    }
    Err(PdfError::Parse("the page has no MediaBox".into()))
}

/// Every field of the document's form, its own and its kids', with their full names.
fn fields(doc: &Document) -> Vec<(String, ObjectId)> {
    let mut out = Vec::new();
    let Ok(form) = doc
        .catalog()
        .and_then(|c| c.get_deref(b"AcroForm", doc))
        .and_then(|f| f.as_dict())
    else {
        return out;
    };
    let Ok(roots) = form.get_deref(b"Fields", doc).and_then(|f| f.as_array()) else {
        return out;
    };
    let mut stack: Vec<(String, ObjectId, usize)> = roots
        .iter()
        .filter_map(|o| o.as_reference().ok())
        .map(|id| (String::new(), id, 0))
        .collect();
    while let Some((prefix, id, depth)) = stack.pop() {
        if depth > 32 || out.len() > 10_000 {
            break;
        }
        let Ok(d) = doc.get_dictionary(id) else {
            continue;
        };
        let own = d
            .get(b"T")
            .and_then(|t| t.as_str())
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .ok();
        let name = match (prefix.is_empty(), own) {
            (_, None) => prefix.clone(),
            (true, Some(t)) => t,
            (false, Some(t)) => format!("{prefix}.{t}"),
        };
        out.push((name.clone(), id));
        if let Ok(kids) = d.get_deref(b"Kids", doc).and_then(|k| k.as_array()) {
            stack.extend(
                kids.iter()
                    .filter_map(|o| o.as_reference().ok())
                    .map(|k| (name.clone(), k, depth + 1)),
            );
        }
    }
    out
}

/// Appends `item` to the array at `key` of the dictionary `owner` (in the new revision),
/// whether the array is inline, an indirect object, or absent.
fn push_to_array(
    inc: &mut IncrementalDocument,
    owner: ObjectId,
    key: &[u8],
    item: Object,
) -> Result<(), PdfError> {
    inc.opt_clone_object_to_new_document(owner)
        .map_err(parse_err)?;
    let current = inc
        .new_document
        .get_dictionary(owner)
        .map_err(parse_err)?
        .get(key)
        .ok()
        .cloned();
    match current {
        Some(Object::Reference(array_id)) => {
            inc.opt_clone_object_to_new_document(array_id)
                .map_err(parse_err)?;
            match inc
                .new_document
                .get_object_mut(array_id)
                .map_err(parse_err)?
            {
                Object::Array(a) => a.push(item),
                _ => return Err(PdfError::Parse(format!("/{} is not an array", show(key)))),
            }
        }
        Some(Object::Array(mut a)) => {
            a.push(item);
            inc.new_document
                .get_dictionary_mut(owner)
                .map_err(parse_err)?
                .set(key.to_vec(), Object::Array(a));
        }
        Some(_) => return Err(PdfError::Parse(format!("/{} is not an array", show(key)))),
        None => inc
            .new_document
            .get_dictionary_mut(owner)
            .map_err(parse_err)?
            .set(key.to_vec(), Object::Array(vec![item])),
    }
    Ok(())
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// A PDF date (ISO 32000-1, 7.9.4) in UTC.
fn pdf_date(unix_seconds: i64) -> String {
    let t = jiff::Timestamp::from_second(unix_seconds).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    format!("D:{}Z", t.strftime("%Y%m%d%H%M%S"))
}

/// A prepared PDF and the name of its new signature field.
pub struct Prepared {
    pub pdf: Vec<u8>,
    pub field: String,
}

/// Prepares `pdf` for the seal `seal_id`: an incremental update with a signature field whose
/// widget shows `image` at `place`, and a `/Contents` of [`RESERVED_BYTES`] zero bytes. Earlier
/// revisions, and so earlier signatures, are kept byte for byte.
pub fn prepare(
    pdf: &[u8],
    seal_id: &str,
    image: &SealImage,
    place: &Place,
    unix_seconds: i64,
) -> Result<Prepared, PdfError> {
    let doc = load(pdf)?;
    let pages = doc.get_pages();
    let page_id = *pages.get(&place.page).ok_or(PdfError::NoPage {
        page: place.page,
        pages: pages.len(),
    })?;
    let media = media_box(&doc, page_id)?;
    let [x1, y1, x2, y2] = place.rect;
    if !(x1 < x2 && y1 < y2)
        || (x1 as f64) < media[0]
        || (y1 as f64) < media[1]
        || (x2 as f64) > media[2]
        || (y2 as f64) > media[3]
    {
        return Err(PdfError::OffPage {
            page: place.page,
            rect: place.rect,
            media,
        });
    }
    let taken: Vec<String> = fields(&doc).into_iter().map(|(n, _)| n).collect();
    let field = (1..)
        .map(|n| format!("Seal-{seal_id}-{n}"))
        .find(|n| !taken.contains(n))
        .expect("an unused name");
    let catalog_id = doc
        .trailer
        .get(b"Root")
        .and_then(|r| r.as_reference())
        .map_err(|_| PdfError::Parse("the trailer names no catalog".into()))?;
    let form = doc
        .get_dictionary(catalog_id)
        .map_err(parse_err)?
        .get(b"AcroForm")
        .ok()
        .cloned();

    let mut inc = IncrementalDocument::create_from(pdf.to_vec(), doc);
    let nd = &mut inc.new_document;
    // The image, and its alpha channel as a soft mask.
    let mut image_dict = Dictionary::from_iter([
        ("Type", Object::Name(b"XObject".to_vec())),
        ("Subtype", Object::Name(b"Image".to_vec())),
        ("Width", Object::Integer(image.width.into())),
        ("Height", Object::Integer(image.height.into())),
        ("ColorSpace", Object::Name(b"DeviceRGB".to_vec())),
        ("BitsPerComponent", Object::Integer(8)),
    ]);
    if let Some(alpha) = &image.alpha {
        let mut mask = Stream::new(
            Dictionary::from_iter([
                ("Type", Object::Name(b"XObject".to_vec())),
                ("Subtype", Object::Name(b"Image".to_vec())),
                ("Width", Object::Integer(image.width.into())),
                ("Height", Object::Integer(image.height.into())),
                ("ColorSpace", Object::Name(b"DeviceGray".to_vec())),
                ("BitsPerComponent", Object::Integer(8)),
            ]),
            alpha.clone(),
        );
        mask.compress()
            .map_err(|e| PdfError::Write(e.to_string()))?;
        let mask_id = nd.add_object(mask);
        image_dict.set("SMask", Object::Reference(mask_id));
    }
    let mut image_stream = Stream::new(image_dict, image.rgb.clone());
    image_stream
        .compress()
        .map_err(|e| PdfError::Write(e.to_string()))?;
    let image_id = nd.add_object(image_stream);
    let (w, h) = (x2 - x1, y2 - y1);
    let appearance = Stream::new(
        Dictionary::from_iter([
            ("Type", Object::Name(b"XObject".to_vec())),
            ("Subtype", Object::Name(b"Form".to_vec())),
            (
                "BBox",
                Object::Array(vec![0.into(), 0.into(), w.into(), h.into()]),
            ),
            (
                "Resources",
                Object::Dictionary(Dictionary::from_iter([(
                    "XObject",
                    Object::Dictionary(Dictionary::from_iter([(
                        "Seal",
                        Object::Reference(image_id),
                    )])),
                )])),
            ),
        ]),
        format!("q {w} 0 0 {h} 0 0 cm /Seal Do Q\n").into_bytes(),
    );
    let appearance_id = nd.add_object(appearance);
    let signature_id = nd.add_object(Dictionary::from_iter([
        ("Type", Object::Name(b"Sig".to_vec())),
        ("Filter", Object::Name(b"Adobe.PPKLite".to_vec())),
        ("SubFilter", Object::Name(b"ETSI.CAdES.detached".to_vec())),
        (
            "ByteRange",
            Object::Array(vec![
                0.into(),
                BYTE_RANGE_PLACEHOLDER.into(),
                BYTE_RANGE_PLACEHOLDER.into(),
                BYTE_RANGE_PLACEHOLDER.into(),
            ]),
        ),
        (
            "Contents",
            Object::String(vec![0; RESERVED_BYTES], StringFormat::Hexadecimal),
        ),
        (
            "M",
            Object::String(pdf_date(unix_seconds).into_bytes(), StringFormat::Literal),
        ),
    ]));
    let widget_id = nd.add_object(Dictionary::from_iter([
        ("Type", Object::Name(b"Annot".to_vec())),
        ("Subtype", Object::Name(b"Widget".to_vec())),
        ("FT", Object::Name(b"Sig".to_vec())),
        (
            "T",
            Object::String(field.clone().into_bytes(), StringFormat::Literal),
        ),
        ("V", Object::Reference(signature_id)),
        (
            "Rect",
            Object::Array(vec![x1.into(), y1.into(), x2.into(), y2.into()]),
        ),
        // Print and Locked.
        ("F", Object::Integer(132)),
        ("P", Object::Reference(page_id)),
        (
            "AP",
            Object::Dictionary(Dictionary::from_iter([(
                "N",
                Object::Reference(appearance_id),
            )])),
        ),
    ]));
    push_to_array(&mut inc, page_id, b"Annots", Object::Reference(widget_id))?;
    // The form: its own object when it is one, else the catalog's inline dictionary or a new one.
    match form {
        Some(Object::Reference(form_id)) => {
            push_to_array(&mut inc, form_id, b"Fields", Object::Reference(widget_id))?;
            inc.new_document
                .get_dictionary_mut(form_id)
                .map_err(parse_err)?
                .set("SigFlags", Object::Integer(3));
        }
        Some(Object::Dictionary(mut f)) => {
            let mut fields = match f.get(b"Fields") {
                Ok(Object::Array(a)) => a.clone(),
                Ok(_) => {
                    return Err(PdfError::Parse(
                        "the form's /Fields is not an inline array".into(),
                    ))
                }
                Err(_) => Vec::new(),
            };
            fields.push(Object::Reference(widget_id));
            f.set("Fields", Object::Array(fields));
            f.set("SigFlags", Object::Integer(3));
            inc.opt_clone_object_to_new_document(catalog_id)
                .map_err(parse_err)?;
            inc.new_document
                .get_dictionary_mut(catalog_id)
                .map_err(parse_err)?
                .set("AcroForm", Object::Dictionary(f));
        }
        Some(_) => {
            return Err(PdfError::Parse(
                "the catalog's /AcroForm is not a dictionary".into(),
            ))
        }
        None => {
            let form_id = inc.new_document.add_object(Dictionary::from_iter([
                ("Fields", Object::Array(vec![Object::Reference(widget_id)])),
                ("SigFlags", Object::Integer(3)),
            ]));
            inc.opt_clone_object_to_new_document(catalog_id)
                .map_err(parse_err)?;
            inc.new_document
                .get_dictionary_mut(catalog_id)
                .map_err(parse_err)?
                .set("AcroForm", Object::Reference(form_id));
        }
    }
    let mut out = Vec::new();
    inc.save_to(&mut out)
        .map_err(|e| PdfError::Write(e.to_string()))?;
    fill_byte_range(&mut out, pdf.len())?;
    Ok(Prepared { pdf: out, field })
}

/// Writes the real ByteRange over the placeholder of the signature appended after `from`.
fn fill_byte_range(out: &mut [u8], from: usize) -> Result<(), PdfError> {
    let placeholder = format!("[0 {p} {p} {p}]", p = BYTE_RANGE_PLACEHOLDER);
    let at = find(&out[from..], placeholder.as_bytes())
        .map(|i| i + from)
        .ok_or_else(|| PdfError::Write("the ByteRange placeholder was not written".into()))?;
    let open = find(&out[at..], b"/Contents")
        .and_then(|i| {
            out[at + i..]
                .iter()
                .position(|&b| b == b'<')
                .map(|j| at + i + j)
        })
        .ok_or_else(|| PdfError::Write("the /Contents string was not written".into()))?;
    let close = out[open..]
        .iter()
        .position(|&b| b == b'>')
        .map(|i| open + i)
        .ok_or_else(|| PdfError::Write("the /Contents string is not closed".into()))?;
    let tail = out.len() - (close + 1);
    let mut range = format!("[0 {open} {} {tail}]", close + 1);
    if range.len() > placeholder.len() {
        return Err(PdfError::Write(
            "the PDF is too large for its ByteRange".into(),
        ));
    }
    while range.len() < placeholder.len() {
        range.insert(range.len() - 1, ' ');
    }
    out[at..at + placeholder.len()].copy_from_slice(range.as_bytes());
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One signature dictionary's ByteRange, checked against the file: two ranges around exactly
/// the `/Contents` hex string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub byte_range: [usize; 4],
    /// Offsets of the `<` and one past the `>` of `/Contents`.
    pub contents: (usize, usize),
    /// The end of the signed bytes: the end of the revision signed.
    pub end: usize,
}

fn checked_range(pdf: &[u8], sig: &Dictionary) -> Result<Range, PdfError> {
    let bad = |m: &str| PdfError::ByteRange(m.into());
    let br = sig
        .get(b"ByteRange")
        .and_then(|o| o.as_array())
        .map_err(|_| bad("the signature has no ByteRange"))?;
    let v: Vec<usize> = br
        .iter()
        .map(|o| o.as_i64().ok().and_then(|i| usize::try_from(i).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a ByteRange number is not a non-negative integer"))?;
    let [a, b, c, d] = v[..] else {
        return Err(bad("a ByteRange is four numbers"));
    };
    let end = c
        .checked_add(d)
        .ok_or_else(|| bad("the ByteRange overflows"))?;
    if a != 0 {
        return Err(bad(
            "the signed bytes do not start at the file's first byte",
        ));
    }
    if b >= c || end > pdf.len() {
        return Err(bad(
            "the ranges are out of order or past the end of the file",
        ));
    }
    let gap = &pdf[b..c];
    if gap.len() < 2
        || gap[0] != b'<'
        || gap[gap.len() - 1] != b'>'
        || !gap[1..gap.len() - 1].iter().all(u8::is_ascii_hexdigit)
    {
        return Err(bad(
            "the bytes left out are not exactly the /Contents hex string",
        ));
    }
    // The gap must be this dictionary's own /Contents: the key just before it.
    let before = &pdf[b.saturating_sub(32)..b];
    if find(before, b"/Contents").is_none() {
        return Err(bad("the bytes left out are not the /Contents value"));
    }
    Ok(Range {
        byte_range: [a, b, c, d],
        contents: (b, c),
        end,
    })
}

/// The signed bytes of a range: the file up to `end`, without the `/Contents` string.
pub fn signed_bytes(pdf: &[u8], r: &Range) -> Vec<u8> {
    let mut v = Vec::with_capacity(r.end - (r.contents.1 - r.contents.0));
    v.extend_from_slice(&pdf[..r.contents.0]);
    v.extend_from_slice(&pdf[r.contents.1..r.end]);
    v
}

/// The raw bytes of a `/Contents` string (hex decoded, an odd digit padded with 0).
fn contents_of(pdf: &[u8], r: &Range) -> Vec<u8> {
    let hexes = &pdf[r.contents.0 + 1..r.contents.1 - 1];
    let mut s = String::from_utf8_lossy(hexes).into_owned();
    if s.len() % 2 == 1 {
        s.push('0');
    }
    hex::decode(s).unwrap_or_default()
}

/// Every signature field with a value in `doc`: field name, widget, signature dictionary.
fn signature_fields(doc: &Document) -> Vec<(String, ObjectId, ObjectId)> {
    fields(doc)
        .into_iter()
        .filter_map(|(name, id)| {
            let d = doc.get_dictionary(id).ok()?;
            let ft = d.get(b"FT").and_then(|o| o.as_name()).ok()?;
            (ft == b"Sig").then_some(())?;
            let v = d.get(b"V").and_then(|o| o.as_reference()).ok()?;
            Some((name, id, v))
        })
        .collect()
}

/// The page (from 1) whose annotations hold `widget`.
fn widget_page(
    doc: &Document,
    pages: &std::collections::BTreeMap<u32, ObjectId>,
    widget: ObjectId,
) -> Option<u32> {
    pages.iter().find_map(|(n, id)| {
        let annots = doc
            .get_dictionary(*id)
            .ok()?
            .get_deref(b"Annots", doc)
            .ok()?
            .as_array()
            .ok()?;
        annots
            .iter()
            .any(|a| a.as_reference().ok() == Some(widget))
            .then_some(*n)
    })
}

/// A widget's rectangle, in points.
fn widget_rect(doc: &Document, widget: ObjectId) -> Option<[f64; 4]> {
    let r = doc
        .get_dictionary(widget)
        .ok()?
        .get(b"Rect")
        .ok()?
        .as_array()
        .ok()?;
    let v: Vec<f64> = r.iter().filter_map(number).collect();
    <[f64; 4]>::try_from(v).ok()
}

/// A prepared signature still waiting for its CMS: its ByteRange and where its seal shows.
#[derive(Clone, Debug)]
pub struct Pending {
    pub range: Range,
    pub field: String,
    pub place: Option<Place>,
}

/// The one signature of a prepared PDF still waiting for its CMS, with its ByteRange, which
/// must cover the whole file but its `/Contents`.
pub fn pending(pdf: &[u8]) -> Result<Pending, PdfError> {
    let doc = load(pdf)?;
    let pages = doc.get_pages();
    let mut waiting = Vec::new();
    for (field, widget, sig) in signature_fields(&doc) {
        let Ok(dict) = doc.get_dictionary(sig) else {
            continue;
        };
        let range = checked_range(pdf, dict)?;
        if contents_of(pdf, &range).iter().all(|&b| b == 0) {
            let place = match (widget_page(&doc, &pages, widget), widget_rect(&doc, widget)) {
                (Some(page), Some(r)) => Some(Place {
                    page,
                    rect: r.map(|x| x.round() as i64),
                }),
                _ => None,
            };
            waiting.push(Pending {
                range,
                field,
                place,
            });
        }
    }
    let p = match waiting.len() {
        0 => return Err(PdfError::NothingReserved),
        1 => waiting.remove(0),
        n => return Err(PdfError::SeveralReserved(n)),
    };
    if p.range.end != pdf.len() {
        return Err(PdfError::ByteRange(format!(
            "the signed bytes end at {} but the file has {}: something was added after preparing",
            p.range.end,
            pdf.len()
        )));
    }
    Ok(p)
}

/// What an approval of a prepared PDF names: the SHA-256 and SHA-512 of its signed bytes.
pub fn digests(pdf: &[u8], r: &Range) -> ([u8; 32], [u8; 64]) {
    let bytes = signed_bytes(pdf, r);
    (Sha256::digest(&bytes).into(), Sha512::digest(&bytes).into())
}

/// The prepared PDF with `cms` (DER) written into its reserved `/Contents`; nothing else moves.
pub fn embed(pdf: &[u8], cms: &[u8]) -> Result<Vec<u8>, PdfError> {
    let r = pending(pdf)?.range;
    let room = (r.contents.1 - r.contents.0 - 2) / 2;
    if cms.len() > room {
        return Err(PdfError::NoRoom {
            need: cms.len(),
            room,
        });
    }
    let mut out = pdf.to_vec();
    let hex = hex::encode_upper(cms);
    out[r.contents.0 + 1..r.contents.0 + 1 + hex.len()].copy_from_slice(hex.as_bytes());
    Ok(out)
}

/// One signature of a PDF, as read back.
#[derive(Debug)]
pub struct Found {
    pub field: String,
    /// The page (from 1) whose annotations hold the widget, if any does.
    pub page: Option<u32>,
    pub rect: Option<[f64; 4]>,
    pub sub_filter: String,
    /// The ByteRange, or why it is not sound.
    pub range: Result<Range, String>,
    /// The CMS (DER, the padding cut off).
    pub cms: Vec<u8>,
    /// The signed bytes (empty when the range is not sound).
    pub signed: Vec<u8>,
    /// How many revisions the file has after the one signed.
    pub later_revisions: usize,
    /// What those revisions changed beyond adding further signatures; empty when nothing.
    pub changes_after: Vec<String>,
}

/// The ends of the file's revisions: one past each `%%EOF`.
fn revision_ends(pdf: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut i = 0;
    while let Some(at) = find(&pdf[i..], b"%%EOF") {
        i += at + 5;
        ends.push(i);
    }
    ends
}

/// `end` moved back over the end-of-line characters before it, so a signed range that ends
/// after `%%EOF` and its newline and a revision end found at `%%EOF` compare equal.
fn trim_end(pdf: &[u8], mut end: usize) -> usize {
    while end > 0 && pdf[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    end
}

/// The length of the DER TLV at the start of `b`, if it is one.
fn der_len(b: &[u8]) -> Option<usize> {
    let (&first, rest) = b.get(1..).and_then(|r| r.split_first())?;
    let _ = rest;
    if first < 0x80 {
        return Some(2 + first as usize);
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 || b.len() < 2 + n {
        return None;
    }
    let len = b[2..2 + n]
        .iter()
        .fold(0usize, |acc, &x| (acc << 8) | x as usize);
    Some(2 + n + len)
}

/// Every signature of `pdf`, in the order they were made.
pub fn signatures(pdf: &[u8]) -> Result<Vec<Found>, PdfError> {
    let doc = load(pdf)?;
    let pages = doc.get_pages();
    let ends = revision_ends(pdf);
    let mut found = Vec::new();
    let mut signed_ends = Vec::new();
    for (field, widget, sig) in signature_fields(&doc) {
        let Ok(dict) = doc.get_dictionary(sig) else {
            continue;
        };
        let page = widget_page(&doc, &pages, widget);
        let rect = widget_rect(&doc, widget);
        let sub_filter = dict
            .get(b"SubFilter")
            .and_then(|o| o.as_name())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        let range = checked_range(pdf, dict).map_err(|e| e.to_string());
        let (cms, signed) = match &range {
            Ok(r) => {
                let raw = contents_of(pdf, r);
                let n = der_len(&raw).unwrap_or(raw.len()).min(raw.len());
                signed_ends.push(trim_end(pdf, r.end));
                (raw[..n].to_vec(), signed_bytes(pdf, r))
            }
            Err(_) => (Vec::new(), Vec::new()),
        };
        found.push(Found {
            field,
            page,
            rect,
            sub_filter,
            range,
            cms,
            signed,
            later_revisions: 0,
            changes_after: Vec::new(),
        });
    }
    found.sort_by_key(|f| f.range.as_ref().map(|r| r.end).unwrap_or(usize::MAX));
    for f in &mut found {
        let Ok(r) = &f.range else { continue };
        let end = trim_end(pdf, r.end);
        f.later_revisions = ends.iter().filter(|&&e| e > end).count();
        if pdf[r.end..].iter().any(|b| !b.is_ascii_whitespace()) {
            f.changes_after = changes_after(pdf, r.end, &signed_ends)?;
        }
    }
    Ok(found)
}

/// What the revisions after `end` changed beyond what a later signature may: a new signature
/// field, its widget on a page's annotations, the form's field list and flags. Anything else
/// (page content, another object rewritten, a revision that is not a signature's) is named.
fn changes_after(pdf: &[u8], end: usize, signed_ends: &[usize]) -> Result<Vec<String>, PdfError> {
    let mut out = Vec::new();
    let before = match Document::load_mem(&pdf[..end]) {
        Ok(d) => d,
        Err(e) => {
            return Ok(vec![format!(
                "the signed revision does not read alone: {e}"
            )])
        }
    };
    let after = load(pdf)?;
    let ends = revision_ends(pdf);
    let signed_end = trim_end(pdf, end);
    for &e in ends.iter().filter(|&&e| e > signed_end) {
        if !signed_ends.contains(&e) {
            out.push(format!(
                "the revision ending at byte {e} is not a signature's: the file was changed after signing"
            ));
        }
    }
    let last = ends.iter().chain(signed_ends).copied().max().unwrap_or(0);
    if pdf.len() > last && !pdf[last..].iter().all(u8::is_ascii_whitespace) {
        out.push(format!(
            "{} bytes follow the last revision",
            pdf.len() - last
        ));
    }
    let catalog = before
        .trailer
        .get(b"Root")
        .and_then(|r| r.as_reference())
        .ok();
    if after
        .trailer
        .get(b"Root")
        .and_then(|r| r.as_reference())
        .ok()
        != catalog
    {
        out.push("the trailer names another catalog than the signed revision's".into());
    }
    let form = catalog
        .and_then(|c| before.get_dictionary(c).ok())
        .and_then(|c| c.get(b"AcroForm").ok())
        .and_then(|f| f.as_reference().ok());
    let pages: Vec<ObjectId> = before.get_pages().values().copied().collect();
    for (id, old) in &before.objects {
        let Some(new) = after.objects.get(id) else {
            continue;
        };
        if old == new {
            continue;
        }
        let allowed = if Some(*id) == catalog {
            same_but(old, new, &[b"AcroForm"])
        } else if Some(*id) == form {
            same_but(old, new, &[b"Fields", b"SigFlags"])
        } else if pages.contains(id) {
            same_but(old, new, &[b"Annots"])
        } else {
            // An indirect /Annots or /Fields array that only grew.
            matches!((old, new), (Object::Array(a), Object::Array(b)) if b.starts_with(a))
        };
        if !allowed {
            out.push(format!(
                "object {} {} was changed after signing",
                id.0, id.1
            ));
        }
    }
    Ok(out)
}

/// Whether two dictionaries are the same but for `keys`.
fn same_but(old: &Object, new: &Object, keys: &[&[u8]]) -> bool {
    let (Ok(a), Ok(b)) = (old.as_dict(), new.as_dict()) else {
        return false;
    };
    let strip = |d: &Dictionary| {
        let mut d = d.clone();
        for k in keys {
            d.remove(k);
        }
        d
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-page PDF written by lopdf itself.
    fn blank(width: i64, height: i64) -> Vec<u8> {
        let mut doc = Document::with_version("1.7");
        let pages_id = doc.new_object_id();
        let content = doc.add_object(Stream::new(Dictionary::new(), b"".to_vec()));
        let page = doc.add_object(Dictionary::from_iter([
            ("Type", Object::Name(b"Page".to_vec())),
            ("Parent", Object::Reference(pages_id)),
            ("Contents", Object::Reference(content)),
        ]));
        doc.objects.insert(
            pages_id,
            Object::Dictionary(Dictionary::from_iter([
                ("Type", Object::Name(b"Pages".to_vec())),
                ("Kids", Object::Array(vec![Object::Reference(page)])),
                ("Count", Object::Integer(1)),
                (
                    "MediaBox",
                    Object::Array(vec![0.into(), 0.into(), width.into(), height.into()]),
                ),
            ])),
        );
        let catalog = doc.add_object(Dictionary::from_iter([
            ("Type", Object::Name(b"Catalog".to_vec())),
            ("Pages", Object::Reference(pages_id)),
        ]));
        doc.trailer.set("Root", Object::Reference(catalog));
        let mut out = Vec::new();
        doc.save_to(&mut out).unwrap();
        out
    }

    fn image() -> SealImage {
        decode_png(&draw_round_seal(64).unwrap()).unwrap()
    }

    #[test]
    fn a_prepared_pdf_keeps_the_original_and_reserves_the_whole_gap() {
        let original = blank(595, 842);
        let place = Place {
            page: 1,
            rect: [400, 100, 513, 213],
        };
        let p = prepare(&original, "contract", &image(), &place, 1_800_000_000).unwrap();
        assert!(p.pdf.starts_with(&original));
        assert_eq!(p.field, "Seal-contract-1");
        let waiting = pending(&p.pdf).unwrap();
        assert_eq!(waiting.field, "Seal-contract-1");
        assert_eq!(waiting.place, Some(place.clone()));
        let r = waiting.range;
        assert_eq!(r.end, p.pdf.len());
        assert_eq!((r.contents.1 - r.contents.0 - 2) / 2, RESERVED_BYTES);
        let signed = embed(&p.pdf, &[0x30, 0x03, 1, 2, 3]).unwrap();
        assert_eq!(signed.len(), p.pdf.len());
        let found = signatures(&signed).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].cms, [0x30, 0x03, 1, 2, 3]);
        assert_eq!(found[0].page, Some(1));
        assert_eq!(found[0].rect, Some([400.0, 100.0, 513.0, 213.0]));
        assert!(found[0].changes_after.is_empty());
        // The digest approved is the one of the bytes signed, which embedding does not move.
        assert_eq!(digests(&p.pdf, &r), {
            let r2 = checked_range(
                &signed,
                &Document::load_mem(&signed)
                    .unwrap()
                    .get_dictionary(signature_fields(&load(&signed).unwrap())[0].2)
                    .unwrap()
                    .clone(),
            )
            .unwrap();
            digests(&signed, &r2)
        });
        // Nothing waits any more.
        assert!(matches!(pending(&signed), Err(PdfError::NothingReserved)));
    }

    #[test]
    fn a_second_seal_keeps_the_first_signature_whole() {
        let one = prepare(
            &blank(595, 842),
            "contract",
            &image(),
            &Place {
                page: 1,
                rect: [50, 50, 150, 150],
            },
            1_800_000_000,
        )
        .unwrap();
        let one = embed(&one.pdf, &[0x30, 0x00]).unwrap();
        let two = prepare(
            &one,
            "official",
            &image(),
            &Place {
                page: 1,
                rect: [300, 50, 400, 150],
            },
            1_800_000_100,
        )
        .unwrap();
        assert_eq!(two.field, "Seal-official-1");
        let two = embed(&two.pdf, &[0x30, 0x00]).unwrap();
        let found = signatures(&two).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].field, "Seal-contract-1");
        assert_eq!(found[0].later_revisions, 1);
        assert!(
            found[0].changes_after.is_empty(),
            "{:?}",
            found[0].changes_after
        );
        // A revision appended afterwards by anyone else is named.
        let mut more = two.clone();
        more.extend_from_slice(b"\n% a note\n");
        let found = signatures(&more).unwrap();
        assert!(!found[1].changes_after.is_empty());
        // A revision that swaps the catalog for a new one is named too.
        let doc = load(&two).unwrap();
        let mut inc = IncrementalDocument::create_from(two.clone(), doc);
        let old_root = inc
            .get_prev_documents()
            .trailer
            .get(b"Root")
            .and_then(|r| r.as_reference())
            .unwrap();
        let copy = inc
            .get_prev_documents()
            .get_object(old_root)
            .unwrap()
            .clone();
        let new_root = inc.new_document.add_object(copy);
        inc.new_document
            .trailer
            .set("Root", Object::Reference(new_root));
        let mut swapped = Vec::new();
        inc.save_to(&mut swapped).unwrap();
        let found = signatures(&swapped).unwrap();
        assert!(
            found[1]
                .changes_after
                .iter()
                .any(|c| c.contains("another catalog")),
            "{:?}",
            found[1].changes_after
        );
    }

    #[test]
    fn bad_placements_and_files_are_refused() {
        let pdf = blank(200, 200);
        let img = image();
        let at = |page, rect| prepare(&pdf, "s", &img, &Place { page, rect }, 0);
        assert!(matches!(
            at(2, [0, 0, 10, 10]),
            Err(PdfError::NoPage { .. })
        ));
        assert!(matches!(
            at(1, [150, 150, 250, 250]),
            Err(PdfError::OffPage { .. })
        ));
        assert!(matches!(
            at(1, [10, 10, 5, 20]),
            Err(PdfError::OffPage { .. })
        ));
        assert!(matches!(
            prepare(
                b"not a pdf",
                "s",
                &img,
                &Place {
                    page: 1,
                    rect: [0, 0, 1, 1]
                },
                0
            ),
            Err(PdfError::Parse(_))
        ));
        assert!(matches!(pending(&pdf), Err(PdfError::NothingReserved)));
        assert!(decode_png(b"\x89PNG\r\n\x1a\n").is_err());
        // Bytes added after preparing are refused before any digest is taken.
        let mut p = at(1, [10, 10, 60, 60]).unwrap().pdf;
        p.extend_from_slice(b"% more\n");
        assert!(matches!(pending(&p), Err(PdfError::ByteRange(_))));
    }
}
