//! The checks of the fuzz targets that need only the `gkm` crate. Each module's
//! `check(data)` reads arbitrary bytes as the input of one of GKM's parsers or validators,
//! calls it, and asserts the properties its callers rely on; it returns quietly for inputs
//! that do not fit the target's framing.

pub mod csi;
pub mod extract;
pub mod labels;
pub mod reference;
pub mod triton;
pub mod view;

/// `data` as at most `n` fields separated by newlines, the last taking the rest (newlines
/// included); fewer when `data` has fewer lines.
pub fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == b'\n').collect()
}

/// `data` split on `sep`, into at most `max` parts, the last taking the rest.
pub fn split_on<'a>(data: &'a [u8], sep: &[u8], max: usize) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < max {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + sep.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}
