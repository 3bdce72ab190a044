//! SQL text helpers used for every SQL span: literal obfuscation ([`obfuscate`]), the
//! operation keyword ([`operation`]) and the table of simple statements
//! ([`collection`]).
//!
//! All three are total (any `&str` in, never a panic), run in O(n) time, allocate
//! only their result and a little scratch space, and never need the database's
//! dialect settings: where PostgreSQL and MySQL read a string differently (a backslash
//! before a quote), [`obfuscate`] hides whatever either reading takes for a literal.

use crate::db::DbSystem;

/// Longest keyword [`operation`] returns.
const MAX_KEYWORD_BYTES: usize = 32;
/// Longest name [`collection`] returns.
const MAX_NAME_BYTES: usize = 256;

/// What a byte of the statement is, in order of how much must be hidden.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// SQL text: keywords, identifiers, numbers, operators, placeholders.
    Code,
    /// A quoted identifier: kept verbatim.
    Ident,
    /// A comment: removed.
    Comment,
    /// A string, dollar-quoted, hex or bit literal: replaced by `?`.
    Literal,
}

/// How one dialect reads quotes and comments.
#[derive(Clone, Copy, Debug)]
struct Dialect {
    /// A backslash escapes the next character in every single-quoted string (MySQL,
    /// PostgreSQL with `standard_conforming_strings = off`); otherwise only in
    /// `E'...'` strings.
    backslash_escapes: bool,
    /// `"..."` is a string (MySQL without `ANSI_QUOTES`) rather than an identifier.
    double_quoted_strings: bool,
    /// `#` starts a comment to the end of the line (MySQL).
    hash_comments: bool,
    /// `/* ... */` comments nest (PostgreSQL): `/* /* */ ... */` is one comment.
    nested_comments: bool,
}

/// PostgreSQL with standard-conforming strings (its comments nest).
const STANDARD: Dialect = Dialect {
    backslash_escapes: false,
    double_quoted_strings: false,
    hash_comments: false,
    nested_comments: true,
};
/// PostgreSQL with `standard_conforming_strings = off`.
const BACKSLASH: Dialect = Dialect {
    backslash_escapes: true,
    ..STANDARD
};
/// Standard strings, comments that end at the first `*/` (SQL Server, SQLite, …).
const FLAT: Dialect = Dialect {
    nested_comments: false,
    ..STANDARD
};
/// Backslash escapes, `"..."` identifiers, flat comments: MySQL in `ANSI_QUOTES`
/// mode.
const FLAT_BACKSLASH: Dialect = Dialect {
    backslash_escapes: true,
    ..FLAT
};
/// MySQL's defaults.
const MYSQL: Dialect = Dialect {
    backslash_escapes: true,
    double_quoted_strings: true,
    hash_comments: true,
    nested_comments: false,
};
/// MySQL with `NO_BACKSLASH_ESCAPES` in its `sql_mode`.
const MYSQL_NO_BACKSLASH: Dialect = Dialect {
    backslash_escapes: false,
    ..MYSQL
};
/// MySQL read as if its comments nested (they do not, but a statement written
/// for a server that does must not show its literals either).
const MYSQL_NESTED: Dialect = Dialect {
    nested_comments: true,
    ..MYSQL
};

/// Replaces literals with `?`, for any SQL dialect.
///
/// - Single-quoted strings (`''` escapes; backslash escapes: where a backslash before
///   a quote makes PostgreSQL and MySQL disagree on where the string ends, everything
///   either takes for a string is hidden), `E'...'`, `N'...'`, `X'...'`, `B'...'`,
///   dollar-quoted strings (`$$...$$`, `$tag$...$tag$`) and numeric literals (`42`,
///   `-1.5e3` → `-?`, `.5`, `0x1F`, `0b101`, `1_000`) become `?`; an unterminated
///   string or comment runs to the end.
/// - Kept as written: identifiers (`t1`, `x$2`, MySQL's `1st_table`), double-quoted
///   and backtick identifiers, placeholders (`$1`, `?`, `:name`, `:1`, `%s`,
///   `%(name)s`), operators, `IN (?, ?, ?)` lists.
/// - Comments (`-- ...`, `/* ... */`) are removed; whitespace runs (comments
///   included) become one space; leading and trailing whitespace is dropped.
///
/// The output is never longer than the input.
pub fn obfuscate(sql: &str) -> String {
    obfuscate_with(sql, &[STANDARD, BACKSLASH, FLAT, FLAT_BACKSLASH])
}

/// [`obfuscate`] for a known database. For MySQL: `"..."` is a string (hidden), `#`
/// starts a comment, and the text is read both with a backslash escaping the next
/// character (the default `sql_mode`: `'it\'s'` is one literal) and without
/// (`NO_BACKSLASH_ESCAPES`: `'C:\tmp\'` ends at its second quote), hiding what
/// either reading takes for a literal, whatever mode the server is in. Other
/// systems get [`obfuscate`].
pub fn obfuscate_for(sql: &str, system: DbSystem) -> String {
    match system {
        DbSystem::Mysql => obfuscate_with(sql, &[MYSQL, MYSQL_NO_BACKSLASH, MYSQL_NESTED]),
        DbSystem::Postgresql | DbSystem::Redis => obfuscate(sql),
    }
}

/// Obfuscates with one or more readings of the text: a byte is hidden if any reading
/// hides it, and a quoted identifier is kept only where every reading agrees.
fn obfuscate_with(sql: &str, dialects: &[Dialect]) -> String {
    let bytes = sql.as_bytes();
    let mut classes = Vec::new();
    for &dialect in dialects {
        let reading = classify(bytes, dialect);
        if classes.is_empty() {
            classes = reading;
            continue;
        }
        for (class, other) in classes.iter_mut().zip(reading) {
            *class = match (*class).max(other) {
                // Identifier in one reading, code in another: anything could be in it.
                Class::Ident if *class != other => Class::Literal,
                most => most,
            };
        }
    }
    emit(bytes, &classes)
}

/// The class of every byte under one dialect.
fn classify(sql: &[u8], dialect: Dialect) -> Vec<Class> {
    let mut classes = vec![Class::Code; sql.len()];
    let mut i = 0;
    while i < sql.len() {
        let b = sql[i];
        let next = sql.get(i + 1).copied();
        let (end, class) = match b {
            b'-' if next == Some(b'-') => (line_end(sql, i), Class::Comment),
            b'#' if dialect.hash_comments => (line_end(sql, i), Class::Comment),
            b'/' if next == Some(b'*') => (
                if dialect.nested_comments {
                    nested_comment_end(sql, i)
                } else {
                    block_comment_end(sql, i)
                },
                Class::Comment,
            ),
            b'\'' => (
                string_end(sql, i, dialect.backslash_escapes),
                Class::Literal,
            ),
            b'"' if dialect.double_quoted_strings => (
                quoted_end(sql, i, b'"', dialect.backslash_escapes),
                Class::Literal,
            ),
            b'"' | b'`' => (quoted_end(sql, i, b, false), Class::Ident),
            b'$' => match dollar_tag_end(sql, i) {
                Some(tag_end) => (dollar_string_end(sql, i, tag_end), Class::Literal),
                None => (i + 1, Class::Code),
            },
            _ if is_ident_start(b) => {
                let end = ident_end(sql, i);
                // A one-letter prefix glued to a string: E'..', X'..', B'..', N'..'.
                if end == i + 1 && sql.get(end) == Some(&b'\'') && b"EeXxBbNn".contains(&b) {
                    let escapes = dialect.backslash_escapes || b == b'E' || b == b'e';
                    (string_end(sql, end, escapes), Class::Literal)
                } else {
                    (end, Class::Code)
                }
            }
            // Digits, placeholders and operators are code; numbers are found later.
            b'0'..=b'9' => (ident_end(sql, i), Class::Code),
            _ => (i + 1, Class::Code),
        };
        let end = end.clamp(i + 1, sql.len());
        if class != Class::Code {
            classes[i..end].fill(class);
        }
        i = end;
    }
    classes
}

/// Writes the statement out: literals as `?`, comments and whitespace runs as one
/// space, numbers as `?`, the rest as is.
fn emit(sql: &[u8], classes: &[Class]) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(sql.len());
    let mut space = false;
    let mut i = 0;
    while i < sql.len() {
        let class = classes[i];
        let run_end = i + classes[i..].iter().take_while(|&&c| c == class).count();
        match class {
            Class::Comment => space = true,
            Class::Literal => {
                separate(&mut out, &mut space);
                out.push(b'?');
            }
            Class::Ident => {
                separate(&mut out, &mut space);
                out.extend_from_slice(&sql[i..run_end]);
            }
            Class::Code => emit_code(sql, i, run_end, &mut out, &mut space),
        }
        i = run_end;
    }
    // Every cut above is next to an ASCII byte or at an end, so this never fails;
    // lossy conversion keeps it total regardless.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Writes the code in `sql[from..to]`: numbers as `?`, whitespace runs as one space.
fn emit_code(sql: &[u8], from: usize, to: usize, out: &mut Vec<u8>, space: &mut bool) {
    let mut i = from;
    while i < to {
        let b = sql[i];
        if b.is_ascii_whitespace() {
            *space = true;
            i += 1;
            continue;
        }
        separate(out, space);
        let next = if i + 1 < to {
            sql.get(i + 1).copied()
        } else {
            None
        };
        let end = if is_ident_start(b) {
            ident_end(sql, i).min(to)
        } else if (b == b'$' || b == b':')
            && next.is_some_and(|c| c.is_ascii_digit())
            && out.last() != Some(&b':')
        {
            // `$1`, `:1` placeholders (but `::int` casts are plain code).
            i + 1
                + sql[i + 1..to]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count()
        } else if b.is_ascii_digit()
            || (b == b'.'
                && next.is_some_and(|c| c.is_ascii_digit())
                && !out.last().is_some_and(|&c| is_ident_byte(c)))
        {
            match number_end(sql, i, to) {
                Some(end) => {
                    out.push(b'?');
                    i = end;
                    continue;
                }
                None => {
                    let end = ident_end(sql, i).min(to).max(i + 1);
                    if sql[i..end]
                        .iter()
                        .all(|&c| c.is_ascii_digit() || c == b'e' || c == b'E' || c == b'.')
                    {
                        // A number cut short (`12e`, as at the end of a capture).
                        out.push(b'?');
                        i = end;
                        continue;
                    }
                    // An identifier that starts with digits (MySQL's `1st_table`).
                    end
                }
            }
        } else {
            i + 1
        };
        out.extend_from_slice(&sql[i..end]);
        i = end;
    }
}

/// Emits the pending separator space, unless at the start.
fn separate(out: &mut Vec<u8>, space: &mut bool) {
    if *space && !out.is_empty() {
        out.push(b' ');
    }
    *space = false;
}

/// The end of a numeric literal starting at `i` (a digit, or `.` and a digit), or
/// `None` if the run of identifier bytes there is not a number (`1abc`).
fn number_end(sql: &[u8], i: usize, limit: usize) -> Option<usize> {
    let at = |j: usize| if j < limit { sql.get(j).copied() } else { None };
    let mut j = i;
    let radix_digits = |j: usize, ok: fn(&u8) -> bool| {
        let mut k = j;
        while at(k).is_some_and(|c| ok(&c) || c == b'_') {
            k += 1;
        }
        k
    };
    if at(j) == Some(b'0') {
        let prefixed = match at(j + 1) {
            Some(b'x' | b'X') if at(j + 2).is_some_and(|c| c.is_ascii_hexdigit()) => {
                Some(radix_digits(j + 2, u8::is_ascii_hexdigit))
            }
            Some(b'b' | b'B') if at(j + 2).is_some_and(|c| c == b'0' || c == b'1') => {
                Some(radix_digits(j + 2, |c| *c == b'0' || *c == b'1'))
            }
            Some(b'o' | b'O') if at(j + 2).is_some_and(|c| (b'0'..=b'7').contains(&c)) => {
                Some(radix_digits(j + 2, |c| (b'0'..=b'7').contains(c)))
            }
            _ => None,
        };
        if let Some(end) = prefixed {
            return (!at(end).is_some_and(is_ident_byte)).then_some(end);
        }
    }
    j = radix_digits(j, u8::is_ascii_digit);
    if at(j) == Some(b'.') && at(j + 1) != Some(b'.') {
        j = radix_digits(j + 1, u8::is_ascii_digit);
    }
    if matches!(at(j), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(at(j + 1), Some(b'+' | b'-')));
        if at(j + 1 + sign).is_some_and(|c| c.is_ascii_digit()) {
            j = radix_digits(j + 1 + sign, u8::is_ascii_digit);
        }
    }
    (j > i && !at(j).is_some_and(is_ident_byte)).then_some(j)
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// End of the run of identifier bytes starting at `i`.
fn ident_end(sql: &[u8], i: usize) -> usize {
    i + sql[i..].iter().take_while(|&&b| is_ident_byte(b)).count()
}

/// End of a line comment: the newline (kept as whitespace) or the end.
fn line_end(sql: &[u8], i: usize) -> usize {
    sql[i..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(sql.len(), |p| i + p)
}

/// End of a `/* ... */` comment (after `*/`), or the end.
fn block_comment_end(sql: &[u8], i: usize) -> usize {
    sql.get(i + 2..)
        .and_then(|rest| rest.windows(2).position(|w| w == b"*/"))
        .map_or(sql.len(), |p| i + 2 + p + 2)
}

/// End of a `/* ... */` comment opened at `i` in which comments nest (after the
/// `*/` that closes the outermost), or the end.
fn nested_comment_end(sql: &[u8], i: usize) -> usize {
    let mut depth = 0usize;
    let mut j = i;
    while j + 1 < sql.len() {
        match (sql[j], sql[j + 1]) {
            (b'/', b'*') => {
                depth += 1;
                j += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                j += 2;
                if depth == 0 {
                    return j;
                }
            }
            _ => j += 1,
        }
    }
    sql.len()
}

/// End of the single-quoted string whose quote is at `i` (after the closing quote),
/// or the end.
fn string_end(sql: &[u8], i: usize, backslash_escapes: bool) -> usize {
    quoted_end(sql, i, b'\'', backslash_escapes)
}

/// End of a quoted run opened by `quote` at `i`, with doubled-quote escapes.
fn quoted_end(sql: &[u8], i: usize, quote: u8, backslash_escapes: bool) -> usize {
    let mut j = i + 1;
    while let Some(&b) = sql.get(j) {
        if backslash_escapes && b == b'\\' {
            j += 2;
        } else if b == quote {
            if sql.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    sql.len()
}

/// If a dollar quote (`$$` or `$tag$`) opens at `i`, the end of its opening tag.
/// `$1` placeholders are not quotes; callers consume identifiers (`a$b`) whole, so a
/// `$` they see here never continues one.
fn dollar_tag_end(sql: &[u8], i: usize) -> Option<usize> {
    let rest = sql.get(i + 1..)?;
    if rest.first() == Some(&b'$') {
        return Some(i + 2);
    }
    if !rest.first().is_some_and(|&b| is_ident_start(b)) {
        return None;
    }
    let tag = rest
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80)
        .count();
    (rest.get(tag) == Some(&b'$')).then_some(i + 1 + tag + 1)
}

/// End of the dollar-quoted string whose tag is `sql[i..tag_end]` (after the closing
/// tag), or the end.
fn dollar_string_end(sql: &[u8], i: usize, tag_end: usize) -> usize {
    let tag = &sql[i..tag_end];
    sql[tag_end..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map_or(sql.len(), |p| tag_end + p + tag.len())
}

// ---- tokens for operation() and collection() ------------------------------------

/// One token of a statement; whitespace and comments are skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    /// A bare word: keyword or identifier.
    Word(&'a str),
    /// A `"..."` or `` `...` `` identifier, quotes included.
    Quoted(&'a str),
    /// A string or dollar-quoted literal.
    Literal,
    /// A number.
    Number,
    /// A placeholder: `$1`, `?`, `:name`, `%s`.
    Param,
    /// Any other ASCII byte (`(`, `)`, `,`, `.`, `;`, operators).
    Punct(u8),
}

/// The tokens of a statement, read the way [`classify`] reads it with MySQL-style
/// backslash escapes.
struct Tokens<'a> {
    sql: &'a str,
    pos: usize,
}

impl<'a> Tokens<'a> {
    fn new(sql: &'a str) -> Self {
        Self { sql, pos: 0 }
    }

    /// The text between two byte offsets that are next to ASCII bytes or at the ends.
    fn text(&self, from: usize, to: usize) -> &'a str {
        self.sql.get(from..to).unwrap_or("")
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let sql = self.sql.as_bytes();
        loop {
            let i = self.pos;
            let b = *sql.get(i)?;
            let next = sql.get(i + 1).copied();
            let (end, token) = match b {
                _ if b.is_ascii_whitespace() => (i + 1, None),
                b'-' if next == Some(b'-') => (line_end(sql, i), None),
                b'/' if next == Some(b'*') => (block_comment_end(sql, i), None),
                b'\'' => (string_end(sql, i, true), Some(Token::Literal)),
                b'"' | b'`' => {
                    let end = quoted_end(sql, i, b, false);
                    (end, Some(Token::Quoted(self.text(i, end))))
                }
                b'$' if next.is_some_and(|c| c.is_ascii_digit()) => {
                    (ident_end(sql, i + 1), Some(Token::Param))
                }
                b'$' => match dollar_tag_end(sql, i) {
                    Some(tag_end) => (dollar_string_end(sql, i, tag_end), Some(Token::Literal)),
                    None => (i + 1, Some(Token::Punct(b))),
                },
                b'?' => (i + 1, Some(Token::Param)),
                b':' if next.is_some_and(is_ident_byte) => {
                    (ident_end(sql, i + 1), Some(Token::Param))
                }
                b'%' if next == Some(b's') || next == Some(b'(') => {
                    // `%s`, `%(name)s`
                    let close = if next == Some(b'(') {
                        sql[i..]
                            .iter()
                            .position(|&c| c == b')')
                            .map_or(sql.len(), |p| i + p + 1)
                    } else {
                        i + 1
                    };
                    (ident_end(sql, close), Some(Token::Param))
                }
                b'0'..=b'9' => (ident_end(sql, i), Some(Token::Number)),
                _ if is_ident_start(b) => {
                    let end = ident_end(sql, i);
                    if end == i + 1 && sql.get(end) == Some(&b'\'') && b"EeXxBbNn".contains(&b) {
                        (string_end(sql, end, true), Some(Token::Literal))
                    } else {
                        (end, Some(Token::Word(self.text(i, end))))
                    }
                }
                _ => (i + 1, Some(Token::Punct(b))),
            };
            self.pos = end.clamp(i + 1, sql.len());
            if let Some(token) = token {
                return Some(token);
            }
        }
    }
}

impl Token<'_> {
    fn is(&self, keyword: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(keyword))
    }

    fn is_any(&self, keywords: &[&str]) -> bool {
        keywords.iter().any(|k| self.is(k))
    }
}

/// The operation keyword, upper case: `SELECT`, `INSERT`, `UPDATE`, `DELETE`,
/// `BEGIN`, `COMMIT`, `SET`, `SHOW`, ... Leading whitespace, comments and opening
/// parentheses are skipped. For `WITH ...`, the keyword of the main statement after
/// the common table expressions (`SELECT`, `INSERT`, ...), or `WITH` when that cannot
/// be found. `None` when the statement does not start with a keyword.
pub fn operation(sql: &str) -> Option<String> {
    let mut tokens = Tokens::new(sql).skip_while(|t| *t == Token::Punct(b'('));
    let Some(Token::Word(first)) = tokens.next() else {
        return None;
    };
    if first.len() > MAX_KEYWORD_BYTES
        || !first.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_')
    {
        return None;
    }
    if first.eq_ignore_ascii_case("WITH") {
        return Some(main_after_ctes(&mut tokens).unwrap_or_else(|| "WITH".to_owned()));
    }
    Some(first.to_ascii_uppercase())
}

/// After `WITH`: skips `[RECURSIVE] name [(columns)] AS [[NOT] MATERIALIZED] (...)`,
/// repeated with commas, and returns the keyword that follows.
fn main_after_ctes<'a>(tokens: &mut impl Iterator<Item = Token<'a>>) -> Option<String> {
    let mut token = tokens.next()?;
    if token.is("RECURSIVE") {
        token = tokens.next()?;
    }
    loop {
        if !matches!(token, Token::Word(_) | Token::Quoted(_)) {
            return None;
        }
        token = tokens.next()?;
        if token == Token::Punct(b'(') {
            skip_parenthesized(tokens)?;
            token = tokens.next()?;
        }
        if !token.is("AS") {
            return None;
        }
        token = tokens.next()?;
        if token.is("NOT") {
            token = tokens.next()?;
        }
        if token.is("MATERIALIZED") {
            token = tokens.next()?;
        }
        if token != Token::Punct(b'(') {
            return None;
        }
        skip_parenthesized(tokens)?;
        token = tokens.next()?;
        if token == Token::Punct(b',') {
            token = tokens.next()?;
            continue;
        }
        while token == Token::Punct(b'(') {
            token = tokens.next()?;
        }
        return match token {
            Token::Word(w)
                if w.len() <= MAX_KEYWORD_BYTES && w.bytes().all(|b| b.is_ascii_alphabetic()) =>
            {
                Some(w.to_ascii_uppercase())
            }
            _ => None,
        };
    }
}

/// After an opening parenthesis: consumes tokens up to its matching closing one.
fn skip_parenthesized<'a>(tokens: &mut impl Iterator<Item = Token<'a>>) -> Option<()> {
    let mut depth = 1usize;
    for token in tokens {
        match token {
            Token::Punct(b'(') => depth += 1,
            Token::Punct(b')') => {
                depth -= 1;
                if depth == 0 {
                    return Some(());
                }
            }
            _ => {}
        }
    }
    None
}

/// Words after which a table name is followed by a join, so the statement is not
/// plain.
const NOT_PLAIN: &[&str] = &[
    "JOIN",
    "INNER",
    "LEFT",
    "RIGHT",
    "FULL",
    "CROSS",
    "NATURAL",
    "STRAIGHT_JOIN",
    "UNION",
    "INTERSECT",
    "EXCEPT",
    "LATERAL",
];

/// Words that may follow a table name and are not an alias.
const AFTER_TABLE: &[&str] = &[
    "WHERE",
    "GROUP",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "FETCH",
    "FOR",
    "HAVING",
    "WINDOW",
    "RETURNING",
    "SET",
    "VALUES",
    "VALUE",
    "DEFAULT",
    "LOCK",
    "INTO",
    "PROCEDURE",
    "ON",
    "OVERRIDING",
    "USE",
    "FORCE",
    "IGNORE",
    "PARTITION",
    "TABLESAMPLE",
    "WITH",
    "SELECT",
    "USING",
    "AS",
    "CASCADE",
    "RESTRICT",
    "RESTART",
    "CONTINUE",
    "ADD",
    "DROP",
    "ALTER",
    "RENAME",
];

/// `db.collection.name` of a plain statement: the one table after `FROM` (`SELECT`,
/// `DELETE FROM`), `INTO` (`INSERT`, `REPLACE`), `UPDATE`, or `TABLE` (`TABLE t`,
/// `TRUNCATE [TABLE]`, `CREATE`/`ALTER`/`DROP TABLE`). Quotes are stripped and a
/// schema is kept (`public.users`); the case is as written.
///
/// `None` for anything not plain: joins, several tables, subqueries, unions, `WITH`,
/// table functions, `UPDATE ... FROM`, `DELETE ... USING`, other statements.
pub fn collection(sql: &str) -> Option<String> {
    let tokens: Vec<Token<'_>> = Tokens::new(sql).collect();
    let start = tokens.iter().position(|t| *t != Token::Punct(b'('))?;
    let statement = &tokens[start..];
    let op = statement.first()?;

    // Subqueries, unions and joins anywhere make it not plain (`LEFT(` and the like
    // are functions).
    let selects = statement.iter().filter(|t| t.is("SELECT")).count();
    let joins = statement
        .windows(2)
        .any(|w| w[0].is_any(NOT_PLAIN) && w[1] != Token::Punct(b'('))
        || statement.last().is_some_and(|t| t.is_any(NOT_PLAIN));
    if selects > usize::from(op.is("SELECT")) || joins {
        return None;
    }

    let name_at = if op.is("SELECT") {
        find_top(statement, "FROM")? + 1
    } else if op.is("DELETE") {
        if statement.iter().any(|t| t.is("USING")) {
            return None;
        }
        // DELETE [LOW_PRIORITY] [QUICK] [IGNORE] FROM t
        let from = find_top(statement, "FROM")?;
        if !statement[1..from]
            .iter()
            .all(|t| t.is_any(&["LOW_PRIORITY", "QUICK", "IGNORE"]))
        {
            return None;
        }
        from + 1
    } else if op.is_any(&["INSERT", "REPLACE"]) {
        find_top(statement, "INTO")? + 1
    } else if op.is("UPDATE") {
        if statement.iter().any(|t| t.is("FROM")) {
            return None;
        }
        1 + statement[1..]
            .iter()
            .take_while(|t| t.is_any(&["LOW_PRIORITY", "IGNORE", "ONLY"]))
            .count()
    } else if op.is_any(&["TABLE", "TRUNCATE", "CREATE", "ALTER", "DROP"]) {
        let table = find_top(statement, "TABLE");
        match table {
            Some(at) => at + 1,
            None if op.is("TRUNCATE") => 1,
            None => return None,
        }
    } else {
        return None;
    };

    // Optional modifiers before the name.
    let mut at = name_at;
    while statement.get(at).is_some_and(|t| {
        t.is_any(&[
            "ONLY",
            "IF",
            "NOT",
            "EXISTS",
            "TEMPORARY",
            "TEMP",
            "UNLOGGED",
        ])
    }) {
        at += 1;
    }
    let (name, after) = qualified_name(statement, at)?;

    // What follows the name: the end, an alias, or a clause; never another table.
    let mut rest = statement[after..].iter();
    let mut next = rest.next();
    if next.is_some_and(|t| t.is("AS")) {
        next = rest.next();
        if !matches!(next, Some(Token::Word(_) | Token::Quoted(_))) {
            return None;
        }
        next = rest.next();
    } else if let Some(Token::Word(_) | Token::Quoted(_)) = next
        && !next.is_some_and(|t| t.is_any(AFTER_TABLE))
    {
        next = rest.next(); // a bare alias
    }
    match next {
        None | Some(Token::Punct(b';')) => Some(name),
        // `(SELECT * FROM t)`
        Some(Token::Punct(b')')) if start > 0 => Some(name),
        Some(Token::Punct(b'(')) if op.is_any(&["INSERT", "REPLACE", "CREATE"]) => Some(name),
        Some(Token::Word(_)) if next.is_some_and(|t| t.is_any(AFTER_TABLE)) => Some(name),
        _ => None,
    }
}

/// Index of the first `keyword` outside parentheses.
fn find_top(tokens: &[Token<'_>], keyword: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        match token {
            Token::Punct(b'(') => depth += 1,
            Token::Punct(b')') => depth = depth.saturating_sub(1),
            _ if depth == 0 && token.is(keyword) => return Some(i),
            _ => {}
        }
    }
    None
}

/// A possibly schema-qualified name starting at `tokens[at]`, quotes stripped, and the
/// index after it.
fn qualified_name(tokens: &[Token<'_>], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    loop {
        let part = match tokens.get(at)? {
            Token::Word(w) if !w.eq_ignore_ascii_case("SELECT") => (*w).to_owned(),
            Token::Quoted(q) => unquote(q)?,
            _ => return None,
        };
        name.push_str(&part);
        at += 1;
        if tokens.get(at) != Some(&Token::Punct(b'.')) {
            break;
        }
        name.push('.');
        at += 1;
    }
    (name.len() <= MAX_NAME_BYTES).then_some((name, at))
}

/// The inside of a `"..."` or `` `...` `` identifier, doubled quotes undone.
fn unquote(quoted: &str) -> Option<String> {
    let quote = quoted.chars().next()?;
    let inner = quoted.strip_prefix(quote)?.strip_suffix(quote)?;
    if inner.is_empty() {
        return None;
    }
    let doubled: String = [quote, quote].iter().collect();
    Some(inner.replace(&doubled, &quote.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn obfuscate_replaces_literals() {
        let cases: &[(&str, &str)] = &[
            // Plain statements
            (
                "SELECT * FROM users WHERE id = 42",
                "SELECT * FROM users WHERE id = ?",
            ),
            (
                "SELECT * FROM users WHERE name = 'O''Brien' AND age > 30",
                "SELECT * FROM users WHERE name = ? AND age > ?",
            ),
            (
                "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y') RETURNING id",
                "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) RETURNING id",
            ),
            (
                "SELECT * FROM t WHERE id IN (1, 2, 3)",
                "SELECT * FROM t WHERE id IN (?, ?, ?)",
            ),
            (
                "SELECT * FROM t LIMIT 10 OFFSET 20",
                "SELECT * FROM t LIMIT ? OFFSET ?",
            ),
            (
                "UPDATE t SET n = n + 1 WHERE k = 'a'",
                "UPDATE t SET n = n + ? WHERE k = ?",
            ),
            ("", ""),
            ("   \n\t ", ""),
            ("-- only a comment", ""),
            ("'a' 'b'", "? ?"),
            // Numbers
            (
                "SELECT 1.5, -2, .5, 1., 1e10, 1.5E-3, 2e+7, 0x1F, 0b101, 0o17, 1_000",
                "SELECT ?, -?, ?, ?, ?, ?, ?, ?, ?, ?, ?",
            ),
            ("WHERE x > -1.5e-3 AND y<2", "WHERE x > -? AND y<?"),
            ("SELECT a+1,b*2.0/3", "SELECT a+?,b*?/?"),
            ("SELECT 1..5", "SELECT ?.?"),
            // Digits inside identifiers and placeholders are not numbers
            (
                "SELECT t1.col2 FROM table3 t1",
                "SELECT t1.col2 FROM table3 t1",
            ),
            (
                "SELECT a$1, x_2y FROM 1st_table",
                "SELECT a$1, x_2y FROM 1st_table",
            ),
            (
                "UPDATE t SET a = $1 WHERE id = $2",
                "UPDATE t SET a = $1 WHERE id = $2",
            ),
            ("SELECT $1::text, $2::int[]", "SELECT $1::text, $2::int[]"),
            (
                "SELECT * FROM t WHERE a = ? AND b = ?",
                "SELECT * FROM t WHERE a = ? AND b = ?",
            ),
            (
                "SELECT * FROM t WHERE a = :name AND b = :1",
                "SELECT * FROM t WHERE a = :name AND b = :1",
            ),
            // psycopg / PyMySQL placeholder styles
            (
                "SELECT * FROM t WHERE a = %s AND b = %(name)s AND c = %b",
                "SELECT * FROM t WHERE a = %s AND b = %(name)s AND c = %b",
            ),
            // psycopg's client-side interpolation (mogrify)
            (
                "INSERT INTO t VALUES (1, 'a', NULL, true, '2024-01-01'::date, 3.14::numeric(10,2))",
                "INSERT INTO t VALUES (?, ?, NULL, true, ?::date, ?::numeric(?,?))",
            ),
            // Quoted identifiers are kept
            (
                "SELECT \"User Name\", \"it's\" FROM \"my table\" WHERE \"a\"\"b\" = 'x'",
                "SELECT \"User Name\", \"it's\" FROM \"my table\" WHERE \"a\"\"b\" = ?",
            ),
            (
                "SELECT `order`, `it's` FROM `db`.`t` WHERE x = 'a'",
                "SELECT `order`, `it's` FROM `db`.`t` WHERE x = ?",
            ),
            // Comments, with quotes inside
            (
                "SELECT /* don't 'x' */ a -- it's a 'comment'\nFROM t",
                "SELECT a FROM t",
            ),
            ("SELECT a -- don't\n, 'x' FROM t", "SELECT a , ? FROM t"),
            ("SELECT 1--comment", "SELECT ?"),
            ("SELECT a/*c*/b", "SELECT a b"),
            ("/* leading */ SELECT 1 /* never closed 'x", "SELECT ?"),
            (
                "SELECT '-- not a comment', '/* nor this */' FROM t",
                "SELECT ?, ? FROM t",
            ),
            // Dollar quotes
            (
                "SELECT $$it's a 'string'$$, $tag$with $$ inside$tag$",
                "SELECT ?, ?",
            ),
            (
                "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1 $body$ LANGUAGE sql",
                "CREATE FUNCTION f() RETURNS int AS ? LANGUAGE sql",
            ),
            ("SELECT $a$ $b$ inner $b$ $a$ x", "SELECT ? x"),
            ("SELECT $$never closed", "SELECT ?"),
            // Prefixed strings
            ("SELECT E'it\\'s', e'\\\\', 'x'", "SELECT ?, ?, ?"),
            (
                "SELECT X'DEADBEEF', B'1010', x'00', N'unicode'",
                "SELECT ?, ?, ?, ?",
            ),
            (
                "SELECT _utf8mb4'abc' COLLATE utf8mb4_bin",
                "SELECT _utf8mb4? COLLATE utf8mb4_bin",
            ),
            // Whitespace
            ("  SELECT\n\t a ,\r\n b   FROM t  ", "SELECT a , b FROM t"),
            // Unterminated strings hide the rest
            (
                "SELECT * FROM t WHERE a = 'unterminated secret",
                "SELECT * FROM t WHERE a = ?",
            ),
            // Backslashes: MySQL reads 'it\'s' as one string, PostgreSQL as 'it\' and
            // more; whatever either takes for a literal is hidden.
            ("SELECT 'a\\', 'secret'", "SELECT ?"),
            (
                "INSERT INTO t VALUES ('it\\'s', 'secret')",
                "INSERT INTO t VALUES (?",
            ),
            ("SELECT 'a\\\\', 'b'", "SELECT ?, ?"),
            // JSON operators and casts (PostgreSQL)
            (
                "SELECT data->>'name' FROM t WHERE data @> '{\"a\":1}' AND tags ? 'x'",
                "SELECT data->>? FROM t WHERE data @> ? AND tags ? ?",
            ),
            (
                "SELECT '1'::int, x::numeric(10,2), arr[1:2]",
                "SELECT ?::int, x::numeric(?,?), arr[?:2]",
            ),
            // Non-ASCII text
            (
                "SELECT 'héllo wörld', naïve_col FROM tàble WHERE x = 'ü'",
                "SELECT ?, naïve_col FROM tàble WHERE x = ?",
            ),
            ("SELECT 1é, é1", "SELECT 1é, é1"),
            // # is an operator in PostgreSQL, kept by the dialect-free version
            ("SELECT a # b FROM t", "SELECT a # b FROM t"),
        ];
        for &(sql, want) in cases {
            assert_eq!(obfuscate(sql), want, "{sql:?}");
            assert_eq!(obfuscate(want), want, "not idempotent on {want:?}");
        }
    }

    /// Literals never show whichever way the server reads backslashes or
    /// comments: MySQL's NO_BACKSLASH_ESCAPES, PostgreSQL's nested comments.
    #[test]
    fn no_reading_of_quotes_or_comments_lets_a_literal_through() {
        let secret = "sk_live_123";
        for (sql, system) in [
            (
                "INSERT INTO t VALUES ('C:\\tmp\\', 'sk_live_123')",
                DbSystem::Mysql,
            ),
            (
                "INSERT INTO t VALUES ('C:\\tmp\\', 'sk_live_123')",
                DbSystem::Postgresql,
            ),
            ("SELECT 1 /* /* */ ' */ 'sk_live_123'", DbSystem::Postgresql),
            ("SELECT 1 /* /* */ ' */ 'sk_live_123'", DbSystem::Mysql),
            (
                "SELECT 1 /* a /* b */ c */ , 'sk_live_123' -- '",
                DbSystem::Postgresql,
            ),
            ("SELECT \"x\\\" 'sk_live_123' \"", DbSystem::Mysql),
        ] {
            let out = obfuscate_for(sql, system);
            assert!(!out.contains(secret), "{system:?} {sql:?} -> {out:?}");
            assert!(!out.contains("tmp"), "{system:?} {sql:?} -> {out:?}");
        }
        // PostgreSQL reads a nested comment whole: what follows is SQL again.
        assert_eq!(
            obfuscate("SELECT a /* x /* y */ z */ FROM t"),
            "SELECT a FROM t"
        );
    }

    #[test]
    fn obfuscate_for_mysql_reads_mysql_strings_and_comments() {
        let cases: &[(&str, &str)] = &[
            (
                "SELECT * FROM t WHERE name = \"alice\" # it's",
                "SELECT * FROM t WHERE name = ?",
            ),
            // Read with and without backslash escapes (the server's sql_mode is
            // not known): a backslash before a quote makes the readings differ,
            // and everything either takes for a literal goes, up to the end.
            (
                "INSERT INTO t VALUES ('it\\'s', 'x')",
                "INSERT INTO t VALUES (?",
            ),
            (
                "INSERT INTO `users` (`name`, `email`) VALUES ('O\\'Brien', 'ob@example.com')",
                "INSERT INTO `users` (`name`, `email`) VALUES (?",
            ),
            (
                "INSERT INTO t VALUES ('a', 'b')",
                "INSERT INTO t VALUES (?, ?)",
            ),
            ("SELECT 5--1", "SELECT ?"),
            ("SELECT \"a\"\"b\", 'c'", "SELECT ?, ?"),
            ("SELECT 1 /*!40101 hint */", "SELECT ?"),
        ];
        for &(sql, want) in cases {
            assert_eq!(obfuscate_for(sql, DbSystem::Mysql), want, "{sql:?}");
        }
        assert_eq!(
            obfuscate_for("SELECT \"col\" FROM t WHERE a = 'x'", DbSystem::Postgresql),
            "SELECT \"col\" FROM t WHERE a = ?"
        );
    }

    #[test]
    fn operation_keywords() {
        let cases: &[(&str, Option<&str>)] = &[
            ("SELECT 1", Some("SELECT")),
            ("  select * from t", Some("SELECT")),
            ("/* c */ -- x\n (SELECT 1) UNION (SELECT 2)", Some("SELECT")),
            ("((select 1))", Some("SELECT")),
            ("select/*x*/1", Some("SELECT")),
            ("insert into t values (1)", Some("INSERT")),
            ("Update t set a = 1", Some("UPDATE")),
            ("DELETE FROM t", Some("DELETE")),
            ("BEGIN", Some("BEGIN")),
            ("commit;", Some("COMMIT")),
            ("ROLLBACK TO SAVEPOINT a", Some("ROLLBACK")),
            ("START TRANSACTION", Some("START")),
            ("SET search_path TO x", Some("SET")),
            ("SHOW TABLES", Some("SHOW")),
            ("EXPLAIN ANALYZE SELECT 1", Some("EXPLAIN")),
            ("CALL proc(1)", Some("CALL")),
            ("WITH a AS (SELECT 1) SELECT * FROM a", Some("SELECT")),
            (
                "WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n+1 FROM t WHERE n < 100) SELECT sum(n) FROM t",
                Some("SELECT"),
            ),
            (
                "WITH a AS MATERIALIZED (SELECT 1), b AS NOT MATERIALIZED (SELECT 2) INSERT INTO x SELECT * FROM a",
                Some("INSERT"),
            ),
            (
                "with moved as (delete from t returning *) update s set n = 1",
                Some("UPDATE"),
            ),
            ("WITH \"q\" AS (SELECT ')') (SELECT 1)", Some("SELECT")),
            ("WITH a AS (SELECT 1) DELETE FROM t", Some("DELETE")),
            ("WITH broken", Some("WITH")),
            ("WITH a AS (SELECT 1", Some("WITH")),
            ("WITH a (SELECT 1) SELECT 2", Some("WITH")),
            ("", None),
            ("   ", None),
            ("-- nothing", None),
            ("123", None),
            ("'x'", None),
            ("$1", None),
            ("\"quoted\" x", None),
            ("sélect 1", None),
        ];
        for &(sql, want) in cases {
            assert_eq!(operation(sql).as_deref(), want, "{sql:?}");
        }
        let long = "A".repeat(100);
        assert_eq!(operation(&long), None);
    }

    #[test]
    fn collection_of_plain_statements() {
        let cases: &[(&str, Option<&str>)] = &[
            ("SELECT * FROM users", Some("users")),
            ("SELECT a, b FROM users WHERE id = $1", Some("users")),
            (
                "select count(*) from public.orders o where o.id = 1",
                Some("public.orders"),
            ),
            (
                "SELECT * FROM \"MySchema\".\"Users\" AS u LIMIT 1",
                Some("MySchema.Users"),
            ),
            (
                "SELECT * FROM `shop`.`order items` FOR UPDATE",
                Some("shop.order items"),
            ),
            ("SELECT * FROM \"a\"\"b\"", Some("a\"b")),
            ("SELECT EXTRACT(YEAR FROM d) FROM events", Some("events")),
            (
                "SELECT LEFT(name, 3), RIGHT(name, 1) FROM people",
                Some("people"),
            ),
            ("SELECT * FROM t USE INDEX (idx) WHERE a = 1", Some("t")),
            ("SELECT * FROM t ORDER BY a, b", Some("t")),
            ("SELECT * FROM t;", Some("t")),
            ("(SELECT * FROM t)", Some("t")),
            ("SELECT * FROM ONLY parent", Some("parent")),
            ("SELECT * FROM t WHERE name = 'x JOIN y, z'", Some("t")),
            (
                "DELETE FROM sessions WHERE expires < now()",
                Some("sessions"),
            ),
            ("DELETE LOW_PRIORITY FROM logs LIMIT 10", Some("logs")),
            ("INSERT INTO t (a, b) VALUES (%s, %s)", Some("t")),
            (
                "INSERT INTO t(a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = 2",
                Some("t"),
            ),
            ("insert into audit values (1)", Some("audit")),
            ("INSERT IGNORE INTO t SET a = 1", Some("t")),
            ("INSERT INTO t DEFAULT VALUES RETURNING id", Some("t")),
            ("REPLACE INTO kv (k, v) VALUES ('a', 'b')", Some("kv")),
            (
                "INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = 1",
                Some("t"),
            ),
            (
                "UPDATE accounts SET balance = balance - 1 WHERE id = 2",
                Some("accounts"),
            ),
            ("UPDATE accounts a SET balance = 0", Some("accounts")),
            ("UPDATE LOW_PRIORITY IGNORE t SET a = 1", Some("t")),
            ("TABLE t", Some("t")),
            ("TRUNCATE t", Some("t")),
            ("TRUNCATE TABLE t RESTART IDENTITY", Some("t")),
            ("CREATE TABLE IF NOT EXISTS t (id int)", Some("t")),
            ("CREATE TEMPORARY TABLE tmp (id int)", Some("tmp")),
            ("ALTER TABLE ONLY t ADD COLUMN c int", Some("t")),
            ("DROP TABLE IF EXISTS t CASCADE", Some("t")),
            // Not plain
            ("SELECT 1", None),
            ("SELECT * FROM a, b", None),
            ("SELECT * FROM a JOIN b ON a.id = b.id", None),
            ("SELECT * FROM a LEFT OUTER JOIN b USING (id)", None),
            ("SELECT * FROM a NATURAL JOIN b", None),
            ("SELECT * FROM (SELECT 1) s", None),
            ("SELECT * FROM t WHERE id IN (SELECT id FROM u)", None),
            ("SELECT (SELECT max(x) FROM b) FROM a", None),
            ("SELECT * FROM a UNION SELECT * FROM b", None),
            ("SELECT * FROM generate_series(1, 3)", None),
            ("WITH a AS (SELECT 1) SELECT * FROM a", None),
            ("INSERT INTO t SELECT * FROM u", None),
            ("UPDATE t SET a = u.a FROM u WHERE t.id = u.id", None),
            ("UPDATE t1, t2 SET t1.a = t2.a", None),
            ("DELETE FROM t USING u WHERE t.id = u.id", None),
            ("DELETE t1 FROM t1 INNER JOIN t2", None),
            ("DROP TABLE a, b", None),
            ("CREATE INDEX idx ON t (a)", None),
            ("CREATE TABLE t AS SELECT 1", None),
            ("SELECT * FROM", None),
            ("SELECT * FROM 'x'", None),
            ("BEGIN", None),
            ("", None),
            ("SELECT * FROM t x y", None),
        ];
        for &(sql, want) in cases {
            assert_eq!(collection(sql).as_deref(), want, "{sql:?}");
        }
        let long = format!("SELECT * FROM {}", "a".repeat(300));
        assert_eq!(collection(&long), None);
    }

    #[test]
    fn tokens_end_at_character_boundaries() {
        let tokens: Vec<Token<'_>> = Tokens::new("%(k)sé %sé :é $1é").collect();
        assert_eq!(tokens, [Token::Param; 4]);
        assert_eq!(operation("%(k)sé"), None);
    }

    #[test]
    fn tokens_skip_comments_and_literals() {
        let tokens: Vec<Token<'_>> =
            Tokens::new("SELECT /* x */ \"a b\", 'c', $$d$$, 1e3, $1, ?, :n, %s -- e\n FROM")
                .collect();
        assert_eq!(
            tokens,
            [
                Token::Word("SELECT"),
                Token::Quoted("\"a b\""),
                Token::Punct(b','),
                Token::Literal,
                Token::Punct(b','),
                Token::Literal,
                Token::Punct(b','),
                Token::Number,
                Token::Punct(b','),
                Token::Param,
                Token::Punct(b','),
                Token::Param,
                Token::Punct(b','),
                Token::Param,
                Token::Punct(b','),
                Token::Param,
                Token::Word("FROM"),
            ]
        );
    }

    // ---- properties ----------------------------------------------------------------

    /// xorshift64*: deterministic, so a failure can be replayed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    fn check_total(sql: &str) {
        let out = obfuscate(sql);
        assert!(out.len() <= sql.len(), "{sql:?} -> {out:?}");
        let mysql = obfuscate_for(sql, DbSystem::Mysql);
        assert!(mysql.len() <= sql.len());
        if let Some(op) = operation(sql) {
            assert!(op.len() <= MAX_KEYWORD_BYTES);
            assert!(
                op.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{op:?}"
            );
        }
        if let Some(name) = collection(sql) {
            assert!(!name.is_empty() && name.len() <= MAX_NAME_BYTES);
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let alphabet: &[u8] = b"'\"`$\\-/*#\n\r\t ();,.:?%0123456789eExXbB_aZ";
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let len = rng.below(64);
            let bytes: Vec<u8> = (0..len)
                .map(|_| match rng.below(8) {
                    0 => rng.next() as u8,
                    _ => alphabet[rng.below(alphabet.len())],
                })
                .collect();
            check_total(&String::from_utf8_lossy(&bytes));
            // Multi-byte characters next to every delimiter.
            let text: String = bytes
                .iter()
                .map(|&b| {
                    if b >= 0x80 {
                        ['é', '€', '𝄞', '\u{a0}'][usize::from(b & 3)]
                    } else {
                        char::from(b)
                    }
                })
                .collect();
            check_total(&text);
        }
    }

    /// A random statement from realistic pieces, and the literal contents (markers)
    /// that must never show in its obfuscation.
    fn random_statement(rng: &mut Rng, n: usize) -> (String, Vec<String>) {
        const CODE: &[&str] = &[
            "SELECT",
            "a",
            "t1.b",
            "FROM",
            "t",
            "WHERE",
            "=",
            "AND",
            "IN (",
            ")",
            "(",
            ",",
            "::int",
            "$1",
            "?",
            ":name",
            "%s",
            "%(k)s",
            "\"Quoted id\"",
            "`tick`",
            "-- it's a comment\n",
            "/* 'quoted' in a comment */",
            "\n",
            "\t",
            "||",
            "-",
            "+",
            "ORDER BY",
            "LIMIT",
            "x$2",
            "1st_col",
            "data->>",
            "@>",
            "#",
            "é",
            "E",
            "X",
            "N",
            "_utf8",
            "::numeric(10,2)",
        ];
        let mut sql = String::new();
        let mut markers = Vec::new();
        for i in 0..n {
            if !sql.is_empty() && rng.below(3) != 0 {
                sql.push(' ');
            }
            let marker = format!("Mk{i}z{}", rng.below(1000));
            match rng.below(10) {
                0 | 1 => {
                    // '...' with doubled quotes, backslashes and comment markers inside
                    let mut body = marker.clone();
                    for _ in 0..rng.below(4) {
                        body.push_str(rng.pick(&[
                            "''", " ", "--", "/*", "*/", "\"", "`", "$$", "é", "\\\\", ";",
                        ]));
                        body.push_str(&marker);
                    }
                    sql.push_str(&format!("'{body}'"));
                    markers.push(marker);
                }
                2 => {
                    // MySQL-style backslash escapes
                    sql.push_str(&format!("'{marker}\\'s {marker}'"));
                    markers.push(marker);
                }
                3 => {
                    // E'' with backslash escapes
                    sql.push_str(&format!("E'{marker}\\'{marker}\\\\'"));
                    markers.push(marker);
                }
                4 => {
                    let tag = rng.pick(&["", "tag", "x_1"]);
                    // Separated: glued to a word, `$` is part of an identifier.
                    sql.push_str(&format!(" ${tag}${marker} 'it''s' $1 ${tag}$"));
                    markers.push(marker);
                }
                5 => {
                    // Numbers with a unique value
                    let value = 700_000_000 + rng.below(99_999_999);
                    let number = match rng.below(4) {
                        0 => format!("{value}"),
                        1 => format!("{value}.25"),
                        2 => format!("{value}e-3"),
                        _ => format!("0x{value:X}"),
                    };
                    // Separated: glued to a word, digits are part of an identifier.
                    sql.push(' ');
                    sql.push_str(&number);
                    sql.push(' ');
                    markers.push(format!("{value}"));
                    markers.push(format!("{value:X}"));
                }
                _ => sql.push_str(rng.pick(CODE)),
            }
        }
        (sql, markers)
    }

    #[test]
    fn literals_never_survive_obfuscation() {
        let mut rng = Rng(7);
        for round in 0..20_000 {
            let n = 1 + rng.below(16);
            let (sql, markers) = random_statement(&mut rng, n);
            let out = obfuscate(&sql);
            let mysql = obfuscate_for(&sql, DbSystem::Mysql);
            for marker in &markers {
                assert!(
                    !out.contains(marker.as_str()),
                    "round {round}: {marker} in {out:?} from {sql:?}"
                );
                assert!(
                    !mysql.contains(marker.as_str()),
                    "round {round}: {marker} in {mysql:?} from {sql:?}"
                );
            }
            assert!(out.len() <= sql.len());
            assert!(
                !out.starts_with(' ') && !out.ends_with(' ') && !out.contains("  "),
                "{out:?}"
            );
            // A prefix (a capture cut anywhere) never shows a literal either.
            let cut = sql
                .char_indices()
                .nth(rng.below(sql.chars().count()))
                .map_or(0, |(i, _)| i);
            let prefix = obfuscate(&sql[..cut]);
            for marker in &markers {
                assert!(
                    !prefix.contains(marker.as_str()),
                    "{marker} in {prefix:?} from {:?}",
                    &sql[..cut]
                );
            }
            check_total(&sql);
        }
    }

    #[test]
    fn obfuscation_is_linear() {
        // Pathological inputs stay fast: many unterminated openers, deep dollar tags.
        for piece in ["'", "$a", "/*", "--", "\"", "$$", "0x", "1e", "E'", "$1"] {
            let sql = piece.repeat(100_000 / piece.len());
            let start = std::time::Instant::now();
            check_total(&sql);
            assert!(
                start.elapsed() < std::time::Duration::from_secs(2),
                "{piece:?} is slow"
            );
        }
    }
}
