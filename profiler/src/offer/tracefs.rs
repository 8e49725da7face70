//! tracefs: making sure it is mounted (tracepoint attachment looks up event ids there, and on
//! some hosts `/sys/kernel/tracing` exists but is empty), and reading its events' `format`
//! files, which say where each field of a tracepoint's record lives (not ABI: the programs'
//! reads are checked against them).

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn has_events(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// Returns the mounted tracefs, mounting it at `/sys/kernel/tracing` when needed.
pub fn ensure_tracefs() -> anyhow::Result<PathBuf> {
    if let Some(found) = CANDIDATES.iter().map(Path::new).find(|d| has_events(d)) {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(CANDIDATES[0]);
    if !target.is_dir() {
        bail!(
            "tracefs is not mounted and {} does not exist: the kernel lacks CONFIG_TRACING, \
             or /sys is not mounted",
            target.display()
        );
    }
    let src = CString::new("nodev").expect("no NUL");
    let dst = CString::new(CANDIDATES[0]).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it at {} failed: {err}. Run as root, or mount \
             it yourself: mount -t tracefs nodev {}",
            CANDIDATES[0],
            CANDIDATES[0]
        );
    }
    if !has_events(target) {
        bail!(
            "mounted tracefs at {} but it has no events/ directory",
            target.display()
        );
    }
    Ok(target.to_path_buf())
}

/// One field of a tracefs event `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    /// The C declaration without the name, e.g. `unsigned int`, `u64`, `__data_loc char[]`.
    pub c_type: String,
    pub offset: usize,
    pub size: usize,
    pub signed: bool,
}

/// A parsed tracefs `events/<system>/<event>/format` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TracepointFormat {
    pub name: Option<String>,
    pub id: Option<u32>,
    /// Common fields first, then the event's own, in file order.
    pub fields: Vec<FormatField>,
}

impl TracepointFormat {
    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }
}

fn parse_field(line_no: usize, line: &str) -> anyhow::Result<FormatField> {
    // `field:unsigned int rw;	offset:8;	size:4;	signed:0;`
    let mut parts = line.split(';').map(str::trim).filter(|p| !p.is_empty());
    let decl = parts
        .next()
        .and_then(|p| p.strip_prefix("field:"))
        .with_context(|| format!("line {line_no}: expected `field:<declaration>;`"))?
        .trim();
    let (c_type, raw_name) = decl
        .rsplit_once(char::is_whitespace)
        .with_context(|| format!("line {line_no}: field declaration `{decl}` has no name"))?;
    // `char comm[16]` names `comm`; `void *ptr` names `ptr`.
    let name = raw_name
        .trim_start_matches('*')
        .split('[')
        .next()
        .unwrap_or_default();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("line {line_no}: field declaration `{decl}` has no valid name");
    }
    let (mut offset, mut size, mut signed) = (None, None, None);
    for part in parts {
        let (key, value) = part
            .split_once(':')
            .with_context(|| format!("line {line_no}: malformed attribute `{part}` of `{name}`"))?;
        let value: usize = value.trim().parse().with_context(|| {
            format!("line {line_no}: `{key}` of field `{name}` is not a number: `{value}`")
        })?;
        match key.trim() {
            "offset" => offset = Some(value),
            "size" => size = Some(value),
            "signed" => signed = Some(value != 0),
            _ => {} // Attributes a future kernel may add.
        }
    }
    let missing = |what: &str| format!("line {line_no}: field `{name}` has no {what}");
    Ok(FormatField {
        name: name.to_string(),
        c_type: c_type.trim().to_string(),
        offset: offset.with_context(|| missing("offset"))?,
        size: size.with_context(|| missing("size"))?,
        // Kernels before 2.6.32 had no `signed`; nothing here needs them, but be lenient.
        signed: signed.unwrap_or(false),
    })
}

/// Parses a tracefs event `format` file. Errors name the line; a file without the
/// `format:` header, without fields, or cut before its `print fmt:` line is rejected.
pub fn parse_format(text: &str) -> anyhow::Result<TracepointFormat> {
    let mut out = TracepointFormat::default();
    let mut in_format = false;
    let mut complete = false;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if !in_format {
            if let Some(name) = trimmed.strip_prefix("name:") {
                out.name = Some(name.trim().to_string());
            } else if let Some(id) = trimmed.strip_prefix("ID:") {
                out.id = Some(id.trim().parse().with_context(|| {
                    format!("line {line_no}: event ID is not a number: `{}`", id.trim())
                })?);
            } else if trimmed == "format:" {
                in_format = true;
            } else {
                bail!("line {line_no}: not a tracefs format file: unexpected `{trimmed}`");
            }
            continue;
        }
        if trimmed.starts_with("print fmt:") {
            complete = true;
            break;
        }
        if !trimmed.starts_with("field:") {
            bail!("line {line_no}: expected a `field:` line, found `{trimmed}`");
        }
        out.fields.push(parse_field(line_no, trimmed)?);
    }
    if !in_format {
        bail!("not a tracefs format file: no `format:` line");
    }
    if out.fields.is_empty() {
        bail!("the format lists no fields");
    }
    if !complete {
        bail!("truncated format: no `print fmt:` line after the fields");
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
