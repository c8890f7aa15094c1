//! Secrets (JWT HMAC keys) written inline, or taken from an environment variable or a file:
//! `secret = "…"`, `secret = { env = "JWT_SECRET" }`, `secret = { file = "/run/secrets/jwt" }`.
//! The value is read while the config loads, so a missing variable or unreadable file fails
//! `--check` and startup with the field's path. Neither `Debug` nor any error shows the value.

use super::{Config, FieldError};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// Where a secret comes from, as written in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline,
    Env(String),
    File(String),
}

#[derive(Clone)]
pub struct Secret {
    pub source: SecretSource,
    /// None until an env/file secret is loaded (and if loading failed).
    value: Option<String>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("source", &self.source)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl Secret {
    pub fn inline(value: impl Into<String>) -> Secret {
        Secret {
            source: SecretSource::Inline,
            value: Some(value.into()),
        }
    }

    /// The secret's bytes; empty if it could not be loaded (the config is then invalid).
    pub fn expose(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default().as_bytes()
    }

    /// Known to be empty; an unloaded env/file secret already has its own error.
    pub fn is_known_empty(&self) -> bool {
        self.value.as_deref() == Some("")
    }

    /// Read an env/file secret; the error names what was missing, never the value.
    fn load(&mut self, path: &str) -> Result<(), FieldError> {
        let fail = |message: String| FieldError {
            path: path.to_string(),
            message,
        };
        let value = match &self.source {
            SecretSource::Inline => return Ok(()),
            SecretSource::Env(var) => std::env::var(var).map_err(|e| {
                fail(match e {
                    std::env::VarError::NotPresent => {
                        format!("environment variable {var:?} is not set")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("environment variable {var:?} is not UTF-8")
                    }
                })
            })?,
            SecretSource::File(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| fail(format!("cannot read secret file {file:?}: {e}")))?;
                // Files written by `echo` or secret stores end in a newline that is not part
                // of the key.
                text.trim_end_matches(['\r', '\n']).to_string()
            }
        };
        if value.is_empty() {
            return Err(fail(format!("{} is empty", self.describe())));
        }
        self.value = Some(value);
        Ok(())
    }

    /// Where it comes from, safe to print.
    pub fn describe(&self) -> String {
        match &self.source {
            SecretSource::Inline => "inline secret".into(),
            SecretSource::Env(v) => format!("environment variable {v:?}"),
            SecretSource::File(f) => format!("secret file {f:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Ref {
            env: Option<String>,
            file: Option<String>,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, { env = \"VAR\" } or { file = \"/path\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::inline(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Secret, A::Error> {
                let r = Ref::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let source = match (r.env, r.file) {
                    (Some(v), None) => SecretSource::Env(v),
                    (None, Some(f)) => SecretSource::File(f),
                    _ => {
                        return Err(de::Error::custom(
                            "a secret takes exactly one of `env` or `file`",
                        ))
                    }
                };
                Ok(Secret {
                    source,
                    value: None,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Config {
    /// Read every env/file secret; one error per secret that cannot be read.
    pub(super) fn load_secrets(&mut self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        if let Some(jwt) = &mut self.auth.jwt {
            for (i, k) in jwt.keys.iter_mut().enumerate() {
                if let Some(s) = &mut k.secret {
                    if let Err(e) = s.load(&format!("auth.jwt.keys[{i}].secret")) {
                        errs.push(e);
                    }
                }
            }
        }
        errs
    }

    /// Advice that does not stop the gateway: printed by `--check`, logged at start.
    pub fn warnings(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        for (i, k) in self.auth.jwt.iter().flat_map(|j| j.keys.iter()).enumerate() {
            if k.secret
                .as_ref()
                .is_some_and(|s| s.source == SecretSource::Inline)
            {
                out.push(FieldError {
                    path: format!("auth.jwt.keys[{i}].secret"),
                    message: "inline secret; prefer { env = \"VAR\" } or { file = \"/path\" } so the config file can be shared".into(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    const VALUE: &str = "very-secret-value-123";

    fn jwt_config(secret: &str) -> String {
        format!("[auth.jwt]\n[[auth.jwt.keys]]\nalgorithm = \"HS256\"\nsecret = {secret}\n")
    }

    fn key_secret(cfg: &Config) -> &Secret {
        cfg.auth.jwt.as_ref().expect("jwt").keys[0]
            .secret
            .as_ref()
            .expect("secret")
    }

    #[test]
    fn secret_from_env_and_file() {
        // A variable name no other test uses: tests run in threads of one process.
        std::env::set_var("L7_TEST_SECRET_FROM_ENV", VALUE);
        let cfg = Config::parse(&jwt_config("{ env = \"L7_TEST_SECRET_FROM_ENV\" }"))
            .expect("env secret");
        assert_eq!(key_secret(&cfg).expose(), VALUE.as_bytes());
        assert!(cfg.warnings().is_empty());

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("jwt");
        std::fs::write(&file, format!("{VALUE}\n")).expect("write");
        let cfg = Config::parse(&jwt_config(&format!(
            "{{ file = {:?} }}",
            file.display().to_string()
        )))
        .expect("file secret");
        assert_eq!(
            key_secret(&cfg).expose(),
            VALUE.as_bytes(),
            "newline trimmed"
        );
        assert!(
            !format!("{cfg:?}").contains(VALUE),
            "Debug must not show the secret"
        );
    }

    #[test]
    fn inline_secret_still_works_with_a_warning() {
        let cfg = Config::parse(&jwt_config(&format!("{VALUE:?}"))).expect("inline");
        assert_eq!(key_secret(&cfg).expose(), VALUE.as_bytes());
        let w = cfg.warnings();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].path, "auth.jwt.keys[0].secret");
        assert!(!w[0].message.contains(VALUE));
        assert!(
            !format!("{cfg:?}").contains(VALUE),
            "Debug must not show the secret"
        );
    }

    #[test]
    fn missing_env_or_file_names_the_field() {
        for (secret, want) in [
            (
                "{ env = \"L7_TEST_SECRET_SURELY_UNSET\" }",
                "L7_TEST_SECRET_SURELY_UNSET",
            ),
            (
                "{ file = \"/nonexistent/jwt-secret\" }",
                "/nonexistent/jwt-secret",
            ),
        ] {
            let Err(ConfigError::Invalid(errs)) = Config::parse(&jwt_config(secret)) else {
                panic!("{secret} accepted");
            };
            assert_eq!(
                errs.len(),
                1,
                "one error, not a second 'needs a secret': {errs:?}"
            );
            assert_eq!(errs[0].path, "auth.jwt.keys[0].secret");
            assert!(errs[0].message.contains(want), "{}", errs[0].message);
        }
        let err = Config::parse(&jwt_config("{ env = \"A\", file = \"/b\" }"))
            .expect_err("both env and file");
        assert!(
            err.to_string().contains("exactly one of `env` or `file`"),
            "{err}"
        );
    }
}
