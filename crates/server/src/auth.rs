//! Who may do what, without I/O but reading the users file: the users file (`--users-file`,
//! token → user id, admin) and the access rules that follow from it. With a users file the
//! user id comes from the caller's token, users see only their own jobs (another user's job is
//! as unknown as one that does not exist) and admins see all. Without it every caller is
//! trusted with the `user_id` it gives, as in the reference server. Finding the caller of a
//! request is [`crate::http`]'s (`http::auth`); this module knows nothing of HTTP, the
//! configuration or the store, so `config` can parse the users file without them.

use std::path::Path;

use jobrelay_common::auth::Secret;
use serde::Deserialize;

/// A user of the users file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub admin: bool,
}

/// What the users file says of a user id besides tokens: its fair-share weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    pub user_id: i64,
    /// Usage counts divided by it under fair share (1 unless given).
    pub weight: f64,
}

/// The users file: tokens and who they stand for.
#[derive(Debug, Clone, Default)]
pub struct Users {
    entries: Vec<(Secret, User)>,
    /// Weights given in the file, by user id.
    shares: Vec<Share>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    token: String,
    user_id: i64,
    #[serde(default)]
    admin: bool,
    /// Fair-share weight of the user id (several tokens of one user give one weight).
    weight: Option<f64>,
}

impl Users {
    /// Parses the TOML text of a users file (`[[users]] token = "..." user_id = 7
    /// admin = false`). Refuses empty or repeated tokens.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: UsersFile =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("bad users file: {e}"))?;
        let mut users = Users::default();
        for (i, entry) in file.users.into_iter().enumerate() {
            let token = Secret::new(entry.token)
                .map_err(|e| anyhow::anyhow!("users file, entry {}: {e}", i + 1))?;
            if entry.user_id < 0 {
                anyhow::bail!(
                    "users file, entry {}: user_id must be a non-negative integer, not {}",
                    i + 1,
                    entry.user_id
                );
            }
            if users.entries.iter().any(|(t, _)| *t == token) {
                anyhow::bail!("users file, entry {}: token used twice", i + 1);
            }
            if let Some(weight) = entry.weight {
                if !(weight.is_finite() && weight > 0.0) {
                    anyhow::bail!(
                        "users file, entry {}: weight must be a number above 0, not {weight}",
                        i + 1
                    );
                }
                match users.shares.iter().find(|s| s.user_id == entry.user_id) {
                    Some(s) if s.weight != weight => anyhow::bail!(
                        "users file, entry {}: user {} is given two weights ({} and {weight})",
                        i + 1,
                        entry.user_id,
                        s.weight
                    ),
                    Some(_) => {}
                    None => users.shares.push(Share {
                        user_id: entry.user_id,
                        weight,
                    }),
                }
            }
            users.add(
                token,
                User {
                    id: entry.user_id,
                    admin: entry.admin,
                },
            );
        }
        if users.entries.is_empty() {
            anyhow::bail!("the users file lists no [[users]]");
        }
        Ok(users)
    }

    /// Reads a users file; refuses one every local user may read (it holds tokens).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read users file {}: {e}", path.display()))?;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o004 != 0 {
            anyhow::bail!(
                "users file {} is readable by every user (mode {:o}); chmod o-r it",
                path.display(),
                mode & 0o777
            );
        }
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The fair-share weights the file gives.
    pub fn shares(&self) -> &[Share] {
        &self.shares
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a user in code (e.g. `jobrelay up` making a token for its operator).
    pub fn add(&mut self, token: Secret, user: User) {
        self.entries.push((token, user));
    }

    /// The user of a token. Every entry is compared (in constant time each), so the time
    /// taken does not say which entry, if any, came close.
    pub fn find(&self, token: &str) -> Option<User> {
        let mut found = None;
        for (secret, user) in &self.entries {
            if secret.matches(token) && found.is_none() {
                found = Some(*user);
            }
        }
        found
    }
}

/// Who made a request, as the handlers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No users file: trusted, with whatever `user_id` it gives.
    Trusted,
    /// A user of the users file.
    User(User),
}

impl Caller {
    /// True if the caller may see and act on a job of `owner`.
    pub fn may_see(&self, owner: i64) -> bool {
        match self {
            Caller::Trusted => true,
            Caller::User(user) => user.admin || user.id == owner,
        }
    }

    /// The only user whose jobs the caller may list, if it is restricted to one.
    pub fn restricted_to(&self) -> Option<i64> {
        match self {
            Caller::User(user) if !user.admin => Some(user.id),
            _ => None,
        }
    }

    /// The user filter of a listing asked with `asked`: `None` when the caller may see none of
    /// the jobs asked for (a user asking for another's), else the filter to apply (a user
    /// lists only their own jobs).
    pub fn list_filter(&self, asked: Option<i64>) -> Option<Option<i64>> {
        match (self.restricted_to(), asked) {
            (Some(own), Some(asked)) if asked != own => None,
            (Some(own), _) => Some(Some(own)),
            (None, asked) => Some(asked),
        }
    }

    /// The owner of a job this caller uploads, `given` the form's `user_id`: the token decides;
    /// an admin may upload for another user; a trusted caller must give one.
    pub fn owner_of_upload(&self, given: Option<i64>) -> Result<i64, OwnerRefused> {
        match (self, given) {
            (Caller::Trusted, Some(id)) => Ok(id),
            (Caller::Trusted, None) => Err(OwnerRefused::Missing),
            (Caller::User(user), None) => Ok(user.id),
            (Caller::User(user), Some(id)) if id == user.id || user.admin => Ok(id),
            (Caller::User(user), Some(asked)) => Err(OwnerRefused::NotYours {
                asked,
                own: user.id,
            }),
        }
    }
}

/// Why [`Caller::owner_of_upload`] found no owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerRefused {
    /// No users file, and the form gave no `user_id`.
    Missing,
    /// A user (not an admin) gave another user's id.
    NotYours { asked: i64, own: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file_parsing_and_lookup() {
        let users = Users::parse(
            r#"
            [[users]]
            token = "alice-token"
            user_id = 7
            [[users]]
            token = "root-token"
            user_id = 1
            admin = true
            "#,
        )
        .unwrap();
        assert_eq!(
            users.find("alice-token"),
            Some(User {
                id: 7,
                admin: false
            })
        );
        assert_eq!(users.find("root-token").map(|u| u.admin), Some(true));
        assert_eq!(users.find("alice"), None);
        assert!(Users::parse(
            "[[users]]\ntoken = \"a\"\nuser_id = 1\n[[users]]\ntoken = \"a\"\nuser_id = 2\n"
        )
        .is_err());
        assert!(Users::parse("[[users]]\ntoken = \"\"\nuser_id = 1\n").is_err());
        assert!(Users::parse("[[users]]\ntoken = \"a\"\nuser_id = -1\n").is_err());
        assert!(Users::parse("[[users]]\ntoken = \"a\"\nuser_id = 0\n").is_ok());
        assert!(Users::parse("[[users]]\ntoken = \"a\"\nuser = 1\n").is_err());
        assert!(Users::parse("").is_err());
    }

    #[test]
    fn fair_share_weights_of_the_users_file() {
        let users = Users::parse(
            "[[users]]\ntoken = \"a\"\nuser_id = 7\nweight = 3\n\
             [[users]]\ntoken = \"b\"\nuser_id = 7\nweight = 3.0\n\
             [[users]]\ntoken = \"c\"\nuser_id = 8\n",
        )
        .unwrap();
        assert_eq!(
            users.shares(),
            [Share {
                user_id: 7,
                weight: 3.0
            }]
        );
        for bad in ["weight = 0", "weight = -1", "weight = nan"] {
            let text = format!("[[users]]\ntoken = \"a\"\nuser_id = 1\n{bad}\n");
            assert!(Users::parse(&text).is_err(), "{bad}");
        }
        let two = "[[users]]\ntoken = \"a\"\nuser_id = 1\nweight = 1\n\
                   [[users]]\ntoken = \"b\"\nuser_id = 1\nweight = 2\n";
        assert!(Users::parse(two)
            .unwrap_err()
            .to_string()
            .contains("two weights"));
    }

    #[test]
    fn what_callers_may_see() {
        let alice = Caller::User(User {
            id: 7,
            admin: false,
        });
        let admin = Caller::User(User { id: 1, admin: true });
        assert!(alice.may_see(7) && !alice.may_see(8));
        assert!(admin.may_see(8) && Caller::Trusted.may_see(8));
        assert_eq!(alice.restricted_to(), Some(7));
        assert_eq!(admin.restricted_to(), None);
        assert_eq!(alice.list_filter(None), Some(Some(7)));
        assert_eq!(alice.list_filter(Some(7)), Some(Some(7)));
        assert_eq!(alice.list_filter(Some(8)), None);
        assert_eq!(admin.list_filter(Some(8)), Some(Some(8)));
        assert_eq!(Caller::Trusted.list_filter(None), Some(None));
    }

    #[test]
    fn who_owns_an_upload() {
        let alice = Caller::User(User {
            id: 7,
            admin: false,
        });
        let admin = Caller::User(User { id: 1, admin: true });
        assert_eq!(Caller::Trusted.owner_of_upload(Some(0)), Ok(0));
        assert_eq!(
            Caller::Trusted.owner_of_upload(None),
            Err(OwnerRefused::Missing)
        );
        assert_eq!(alice.owner_of_upload(None), Ok(7));
        assert_eq!(alice.owner_of_upload(Some(7)), Ok(7));
        assert_eq!(
            alice.owner_of_upload(Some(8)),
            Err(OwnerRefused::NotYours { asked: 8, own: 7 })
        );
        assert_eq!(admin.owner_of_upload(Some(8)), Ok(8));
    }
}
