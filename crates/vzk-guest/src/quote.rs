//! POSIX shell quoting: turns an argv into ONE command string for an SSH `exec`
//! request.
//!
//! SSH has no argv: the server hands the request string to the user's login shell as
//! `$SHELL -c <string>`. To make the remote program receive exactly the caller's
//! argv, every element is wrapped in single quotes, and an embedded `'` becomes
//! `'\''` (close the quote, an escaped quote, reopen). Inside single quotes a POSIX
//! shell interprets nothing — not `$`, backticks, backslashes or newlines — so any
//! byte sequence without NUL survives unchanged.
//!
//! The command is prefixed with `exec` so the shell *replaces itself* with the
//! program: the SSH session's process is then the program itself, and a `signal`
//! request (used to cancel an exec) reaches it instead of an intermediate shell.

/// Quotes one word for a POSIX shell.
///
/// The result always starts and ends with `'`, so it is one word even when `word` is
/// empty or holds whitespace.
pub fn quote_word(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Joins `argv` into one shell command line, each element quoted with
/// [`quote_word`] and separated by a space.
pub fn quote_argv<S: AsRef<str>>(argv: &[S]) -> String {
    let words: Vec<String> = argv.iter().map(|a| quote_word(a.as_ref())).collect();
    words.join(" ")
}

/// Whether `name` is a valid POSIX environment variable name
/// (`[A-Za-z_][A-Za-z0-9_]*`), i.e. safe to use unquoted in `export NAME=…`.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c == '_' || c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// The `exec` request string for `argv` with `env` exported first:
/// `export A='1' B='2'; exec 'argv0' 'argv1' …`.
///
/// The caller has checked every name with [`is_env_name`] and that `argv` is not
/// empty and holds no NUL.
pub(crate) fn exec_command<S: AsRef<str>>(argv: &[S], env: &[(String, String)]) -> String {
    let mut cmd = String::new();
    if !env.is_empty() {
        cmd.push_str("export");
        for (name, value) in env {
            cmd.push(' ');
            cmd.push_str(name);
            cmd.push('=');
            cmd.push_str(&quote_word(value));
        }
        cmd.push_str("; ");
    }
    cmd.push_str("exec ");
    cmd.push_str(&quote_argv(argv));
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_plain_and_special_words() {
        assert_eq!(quote_word("ls"), "'ls'");
        assert_eq!(quote_word(""), "''");
        assert_eq!(quote_word("a b"), "'a b'");
        assert_eq!(quote_word("it's"), "'it'\\''s'");
        assert_eq!(quote_word("$HOME `x` \\n"), "'$HOME `x` \\n'");
        assert_eq!(quote_argv(&["echo", "a'b", ""]), "'echo' 'a'\\''b' ''");
    }

    #[test]
    fn env_names_are_validated() {
        assert!(is_env_name("PATH"));
        assert!(is_env_name("_x1"));
        assert!(!is_env_name(""));
        assert!(!is_env_name("1A"));
        assert!(!is_env_name("A-B"));
        assert!(!is_env_name("A B"));
        assert!(!is_env_name("A=B"));
    }

    #[test]
    fn exec_command_exports_env_then_execs() {
        let env = vec![
            ("A".to_owned(), "x y".to_owned()),
            ("B".to_owned(), "'".to_owned()),
        ];
        assert_eq!(exec_command(&["true"], &[]), "exec 'true'");
        assert_eq!(
            exec_command(&["env"], &env),
            "export A='x y' B=''\\'''; exec 'env'"
        );
    }

    /// The quoted string, run by a real `/bin/sh -c`, gives the program exactly the
    /// original argv (checked with `printf '%s\0'`, so newlines are data too).
    #[test]
    fn real_shell_receives_argv_intact() {
        let tricky: Vec<&str> = vec![
            "printf",
            "%s\\0",
            "plain",
            "with space",
            "single ' quote",
            "double \" quote",
            "$HOME and ${PATH} and $(id) and `id`",
            "back\\slash",
            "new\nline",
            "",
            "*",
            "; rm -rf /nonexistent &&",
            "tab\there",
            "ünïcødé",
        ];
        let cmd = exec_command(&tricky, &[]);
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&cmd)
            .output();
        let out = match out {
            Ok(o) => o,
            Err(e) => panic!("running /bin/sh: {e}"),
        };
        assert!(out.status.success(), "sh failed: {out:?}");
        let mut expect = Vec::new();
        for a in &tricky[2..] {
            expect.extend_from_slice(a.as_bytes());
            expect.push(0);
        }
        assert_eq!(out.stdout, expect);
    }
}
