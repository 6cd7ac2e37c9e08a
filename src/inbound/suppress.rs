//! The one suppression store every campaign consults: the campaign's `suppression` file
//! (one address or `@domain` a line, `#` starts a comment), which inbound processing appends
//! to. Writers take an exclusive `flock` for each append and readers a shared one
//! ([`read_locked`], used by `campaign::recipients::Suppression::load`), so a campaign never
//! reads half a line.
//!
//! [`SuppressionStore`] is the seam for other stores (a Redis set shared by nodes); this module
//! has the file store only.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where suppressed addresses are kept.
pub trait SuppressionStore: Send {
    /// Adds `address` (lower-cased) with `note` (why and when, one line); `Ok(false)` when it
    /// was already there.
    fn suppress(&mut self, address: &str, note: &str) -> io::Result<bool>;
    /// Whether `address` or its domain is suppressed.
    fn contains(&self, address: &str) -> bool;
}

/// A suppression file shared with campaigns.
#[derive(Debug)]
pub struct FileSuppression {
    path: PathBuf,
    entries: HashSet<String>,
}

struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn new(file: &'a File, operation: libc::c_int) -> io::Result<Flock<'a>> {
        // SAFETY: flock on a descriptor this File owns; the lock is released in Drop.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Flock(file))
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above; unlocking a descriptor we locked.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Reads a suppression file under a shared lock.
pub fn read_locked(path: &Path) -> io::Result<String> {
    let file = File::open(path)?;
    let _lock = Flock::new(&file, libc::LOCK_SH)?;
    let mut text = String::new();
    (&file).read_to_string(&mut text)?;
    Ok(text)
}

/// The entries of a suppression file's text, lower case (`@domain` as `domain`).
pub fn entries(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines().filter_map(|line| {
        let entry = line.split('#').next().unwrap_or("").trim();
        (!entry.is_empty()).then(|| entry.strip_prefix('@').unwrap_or(entry).to_lowercase())
    })
}

impl FileSuppression {
    /// Opens (creating it when missing) the file at `path`.
    pub fn open(path: &Path) -> io::Result<FileSuppression> {
        OpenOptions::new().create(true).append(true).open(path)?;
        let entries = entries(&read_locked(path)?).collect();
        Ok(FileSuppression {
            path: path.to_path_buf(),
            entries,
        })
    }
}

impl SuppressionStore for FileSuppression {
    fn suppress(&mut self, address: &str, note: &str) -> io::Result<bool> {
        let address = address.to_lowercase();
        if self.contains(&address) {
            return Ok(false);
        }
        let file = OpenOptions::new().append(true).open(&self.path)?;
        let _lock = Flock::new(&file, libc::LOCK_EX)?;
        let note: String = note
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        // One write per line, so concurrent appenders never interleave within it.
        (&file).write_all(format!("{address}  # {note}\n").as_bytes())?;
        file.sync_data()?;
        self.entries.insert(address);
        Ok(true)
    }

    fn contains(&self, address: &str) -> bool {
        let address = address.to_lowercase();
        self.entries.contains(&address)
            || address
                .rsplit_once('@')
                .is_some_and(|(_, d)| self.entries.contains(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_once_and_reads_back_in_the_campaign_format() {
        let dir = std::env::temp_dir().join(format!("mxpipe-suppress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("suppressed.txt");
        std::fs::write(&path, "@blocked.example\nold@example.org # by hand\n").unwrap();
        let mut store = FileSuppression::open(&path).unwrap();
        assert!(store.contains("OLD@example.org"));
        assert!(store.contains("anyone@blocked.example"));
        assert!(store
            .suppress("Ann@Example.NET", "hard bounce\n5.1.1")
            .unwrap());
        assert!(!store.suppress("ann@example.net", "again").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "@blocked.example\nold@example.org # by hand\nann@example.net  # hard bounce 5.1.1\n"
        );
        let again = FileSuppression::open(&path).unwrap();
        assert!(again.contains("ann@example.net"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
