//! The password file that `mxpipe serve` checks AUTH PLAIN and LOGIN against: one
//! `user:hash` line per user, the hash an Argon2 PHC string (`$argon2id$v=19$...`) as
//! [`hash_password`] (`mxpipe serve hash-password`) makes it. Passwords are never stored or
//! logged in clear; a line that is not `user:hash` stops the start with its line number.

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ring::rand::SecureRandom;

/// The users and their hashes.
#[derive(Debug, Default)]
pub struct PasswordFile {
    users: HashMap<String, String>,
}

impl PasswordFile {
    /// Reads and checks `path`. Blank lines and lines starting with `#` are skipped.
    pub fn load(path: &Path) -> Result<PasswordFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("auth_password_file {}: {e}", path.display()))?;
        PasswordFile::parse(&text)
            .map_err(|e| format!("auth_password_file {}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<PasswordFile, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {}: not user:hash", i + 1));
            };
            if user.is_empty() {
                return Err(format!("line {}: empty user name", i + 1));
            }
            PasswordHash::new(hash).map_err(|e| {
                format!(
                    "line {}: the hash of {user:?} is not a PHC string: {e}",
                    i + 1
                )
            })?;
            users.insert(user.to_owned(), hash.to_owned());
        }
        Ok(PasswordFile { users })
    }

    /// Whether `password` is `user`'s. Unknown users cost a hash as well, so that timing does
    /// not tell which users exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        const DECOY: &str =
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$4Rrd9cEXItuQ8yDUtLKxaGf3qr8L9Nh1c9JLCMbhPEo";
        let (hash, known) = match self.users.get(user) {
            Some(hash) => (hash.as_str(), true),
            None => (DECOY, false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        Argon2::default().verify_password(password, &parsed).is_ok() && known
    }
}

/// An Argon2id PHC string for `password` with a fresh random salt, for the password file.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| "no random numbers for the salt".to_owned())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_password_verifies_and_others_do_not() {
        let hash = hash_password(b"s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let file = PasswordFile::parse(&format!("# users\n\nann:{hash}\n")).unwrap();
        assert!(file.verify("ann", b"s3cret"));
        assert!(!file.verify("ann", b"s3cret "));
        assert!(!file.verify("bob", b"s3cret"));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(
            PasswordFile::parse("ann\n").unwrap_err(),
            "line 1: not user:hash"
        );
        let error = PasswordFile::parse("\nann:plaintext\n").unwrap_err();
        assert!(error.starts_with("line 2: the hash of \"ann\""), "{error}");
    }
}
