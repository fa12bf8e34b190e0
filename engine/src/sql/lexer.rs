//! The lexer: script text to tokens, each with its 1-based line and column (counted in
//! characters) and its byte span, so that the parser can say where a token is and quote it.
//!
//! It owns T-SQL's lexical rules as Herald accepts them: `--` and nestable `/* */` comments;
//! bare identifiers (a letter, `_` or `#`, then letters, digits, `_`, `@`, `$`, `#`);
//! `[bracketed]` (with `]]`) and `"quoted"` (with `""`) identifiers; `@variables` (and
//! `@@name`, kept as the variable `@name`); `'strings'` (with `''`) and `N'strings'`; `0x…`
//! binary literals (an odd digit count gets a leading zero nibble, as in T-SQL); unsigned
//! integers (the parser applies a minus sign); and `GO` when it is the first token of its line
//! and nothing but blanks or a `--` comment follows it there.
//!
//! Invariants: every name token (bare, bracketed, quoted, variable) is non-empty and at most
//! `NAME_BYTES_MAX` bytes; once the lexer has produced `Eof` or `Invalid`, it produces only `Eof`.

use super::{NAME_BYTES_MAX, SyntaxError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// A bare identifier or keyword, as written (its text is the span).
    Word,
    /// A `[bracketed]` or `"quoted"` identifier, unescaped.
    Quoted(String),
    /// `@name`, without the `@`.
    Variable(String),
    Str {
        value: String,
        national: bool,
    },
    Binary(Vec<u8>),
    /// An unsigned integer; a minus sign is a separate token.
    Int(u64),
    Symbol(Symbol),
    /// A `GO` batch separator line.
    Go,
    /// Text that is no token (an unterminated string, a stray character), with why.
    Invalid(String),
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Symbol {
    LParen,
    RParen,
    Comma,
    Semicolon,
    Eq,
    /// `<>` or `!=`
    NotEq,
    Dot,
    Star,
    Minus,
}

impl Symbol {
    pub(crate) fn text(self) -> &'static str {
        match self {
            Symbol::LParen => "(",
            Symbol::RParen => ")",
            Symbol::Comma => ",",
            Symbol::Semicolon => ";",
            Symbol::Eq => "=",
            Symbol::NotEq => "<>",
            Symbol::Dot => ".",
            Symbol::Star => "*",
            Symbol::Minus => "-",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: TokenKind,
    pub line: u32,
    pub column: u32,
    /// Byte span in the script.
    pub start: usize,
    pub end: usize,
}

/// Produces the tokens of a script one at a time, so that the parser holds only a short
/// window of them (a 16 MiB script of `(` would otherwise be 16 million tokens in memory).
/// After an invalid token it produces only `Eof`.
#[derive(Debug)]
pub(crate) struct Lexer<'a> {
    text: &'a str,
    pos: usize,
    line: u32,
    column: u32,
    /// The line of the last token produced, to tell whether a `GO` starts its line.
    last_token_line: u32,
    failed: bool,
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(text: &'a str) -> Lexer<'a> {
        Lexer {
            text,
            pos: 0,
            line: 1,
            column: 1,
            last_token_line: 0,
            failed: false,
        }
    }

    /// The next token: `Eof` at the end (and forever after), `Invalid` where the text is not
    /// a token (the parser reports it when it gets there).
    pub(crate) fn next_token(&mut self) -> Token {
        if self.failed {
            return self.token(TokenKind::Eof, self.text.len(), self.line, self.column);
        }
        match self.lex() {
            Ok(token) => token,
            Err(e) => {
                self.failed = true;
                Token {
                    kind: TokenKind::Invalid(e.message),
                    line: e.line,
                    column: e.column,
                    start: self.pos,
                    end: self.pos,
                }
            }
        }
    }

    fn lex(&mut self) -> Result<Token, SyntaxError> {
        self.skip_blanks_and_comments()?;
        let (start, line, column) = (self.pos, self.line, self.column);
        let Some(c) = self.peek() else {
            return Ok(self.token(TokenKind::Eof, start, line, column));
        };
        let kind = match c {
            '\'' => self.string(false)?,
            'N' | 'n' if self.peek_second() == Some('\'') => {
                self.bump();
                self.string(true)?
            }
            '[' => self.delimited(']', "[")?,
            '"' => self.delimited('"', "\"")?,
            '@' => self.variable()?,
            '0'..='9' => self.number()?,
            c if is_word_start(c) => {
                self.word()?;
                if line != self.last_token_line
                    && self.text[start..self.pos].eq_ignore_ascii_case("GO")
                    && self.rest_of_line_is_blank()
                {
                    TokenKind::Go
                } else {
                    TokenKind::Word
                }
            }
            _ => TokenKind::Symbol(self.symbol(c)?),
        };
        Ok(self.token(kind, start, line, column))
    }

    fn token(&mut self, kind: TokenKind, start: usize, line: u32, column: u32) -> Token {
        self.last_token_line = line;
        Token {
            kind,
            line,
            column,
            start,
            end: self.pos,
        }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.text[self.pos..].chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        if c == '\n' {
            self.line = self.line.saturating_add(1);
            self.column = 1;
        } else {
            self.column = self.column.saturating_add(1);
        }
        Some(c)
    }

    fn error(&self, line: u32, column: u32, message: String) -> SyntaxError {
        SyntaxError {
            line,
            column,
            message,
        }
    }

    fn skip_blanks_and_comments(&mut self) -> Result<(), SyntaxError> {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() || c == '\u{feff}' => {
                    self.bump();
                }
                Some('-') if self.peek_second() == Some('-') => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                Some('/') if self.peek_second() == Some('*') => self.block_comment()?,
                _ => return Ok(()),
            }
        }
    }

    /// `/* … */`, nesting as T-SQL's do.
    fn block_comment(&mut self) -> Result<(), SyntaxError> {
        let (line, column) = (self.line, self.column);
        let mut depth = 0usize;
        loop {
            match self.peek() {
                None => {
                    return Err(self.error(line, column, "unterminated /* comment".into()));
                }
                Some('/') if self.peek_second() == Some('*') => {
                    self.bump();
                    self.bump();
                    depth += 1;
                }
                Some('*') if self.peek_second() == Some('/') => {
                    self.bump();
                    self.bump();
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                Some(_) => {
                    self.bump();
                }
            }
        }
    }

    /// True when only blanks, or a `--` comment, follow on this line (for `GO`).
    fn rest_of_line_is_blank(&self) -> bool {
        let rest = self.text[self.pos..].trim_start_matches([' ', '\t', '\r']);
        rest.is_empty() || rest.starts_with('\n') || rest.starts_with("--")
    }

    /// `'…'` with `''` for a quote; the cursor is on the opening quote.
    fn string(&mut self, national: bool) -> Result<TokenKind, SyntaxError> {
        let (line, column) = (self.line, self.column);
        self.bump();
        let mut value = String::new();
        loop {
            match self.bump() {
                None => {
                    return Err(self.error(line, column, "unterminated string literal".into()));
                }
                Some('\'') if self.peek() == Some('\'') => {
                    self.bump();
                    value.push('\'');
                }
                Some('\'') => return Ok(TokenKind::Str { value, national }),
                Some(c) => value.push(c),
            }
        }
    }

    /// `[name]` or `"name"`, the closing character doubled inside.
    fn delimited(&mut self, close: char, open: &str) -> Result<TokenKind, SyntaxError> {
        let (line, column) = (self.line, self.column);
        self.bump();
        let mut value = String::new();
        loop {
            match self.bump() {
                None => {
                    return Err(self.error(
                        line,
                        column,
                        format!("unterminated {open}{close} identifier"),
                    ));
                }
                Some(c) if c == close && self.peek() == Some(close) => {
                    self.bump();
                    value.push(close);
                }
                Some(c) if c == close => break,
                Some(c) => value.push(c),
            }
        }
        if value.is_empty() {
            return Err(self.error(line, column, format!("empty {open}{close} identifier")));
        }
        self.check_name_length(&value, line, column)?;
        Ok(TokenKind::Quoted(value))
    }

    fn variable(&mut self) -> Result<TokenKind, SyntaxError> {
        let (line, column) = (self.line, self.column);
        self.bump();
        let name_start = self.pos;
        if self.peek() == Some('@') {
            self.bump();
        }
        while self.peek().is_some_and(is_word_char) {
            self.bump();
        }
        let name = &self.text[name_start..self.pos];
        if name.is_empty() || name == "@" {
            return Err(self.error(line, column, "expected a variable name after '@'".into()));
        }
        self.check_name_length(name, line, column)?;
        Ok(TokenKind::Variable(name.to_owned()))
    }

    fn word(&mut self) -> Result<(), SyntaxError> {
        let (start, line, column) = (self.pos, self.line, self.column);
        while self.peek().is_some_and(is_word_char) {
            self.bump();
        }
        self.check_name_length(&self.text[start..self.pos], line, column)
    }

    fn number(&mut self) -> Result<TokenKind, SyntaxError> {
        let (start, line, column) = (self.pos, self.line, self.column);
        if self.peek() == Some('0') && matches!(self.peek_second(), Some('x' | 'X')) {
            self.bump();
            self.bump();
            let digits_start = self.pos;
            while self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                self.bump();
            }
            let digits = &self.text[digits_start..self.pos];
            if self.peek().is_some_and(is_word_char) {
                return Err(self.bad_number(start, line, column, "binary literal"));
            }
            // An odd count of digits gets a leading zero nibble: T-SQL reads 0xABC as 0x0ABC.
            let padded: String = if digits.len() % 2 == 1 {
                format!("0{digits}")
            } else {
                digits.to_owned()
            };
            let bytes = padded
                .as_bytes()
                .chunks(2)
                .map(|pair| (hex_value(pair[0]) << 4) | hex_value(pair[1]))
                .collect();
            return Ok(TokenKind::Binary(bytes));
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
        if self.peek() == Some('.') {
            return Err(self.error(
                line,
                column,
                "decimal numbers are not supported by Herald (integers only)".into(),
            ));
        }
        if self.peek().is_some_and(is_word_char) {
            return Err(self.bad_number(start, line, column, "number"));
        }
        let digits = &self.text[start..self.pos];
        digits
            .parse::<u64>()
            .map(TokenKind::Int)
            .map_err(|_| self.error(line, column, format!("integer {digits} is out of range")))
    }

    fn bad_number(&mut self, start: usize, line: u32, column: u32, what: &str) -> SyntaxError {
        while self.peek().is_some_and(is_word_char) {
            self.bump();
        }
        let text = quote(&self.text[start..self.pos]);
        self.error(line, column, format!("invalid {what} {text}"))
    }

    fn symbol(&mut self, c: char) -> Result<Symbol, SyntaxError> {
        let (line, column) = (self.line, self.column);
        let second = self.peek_second();
        self.bump();
        Ok(match c {
            '(' => Symbol::LParen,
            ')' => Symbol::RParen,
            ',' => Symbol::Comma,
            ';' => Symbol::Semicolon,
            '=' => Symbol::Eq,
            '.' => Symbol::Dot,
            '*' => Symbol::Star,
            '-' => Symbol::Minus,
            '<' if second == Some('>') => {
                self.bump();
                Symbol::NotEq
            }
            '!' if second == Some('=') => {
                self.bump();
                Symbol::NotEq
            }
            other => {
                return Err(self.error(
                    line,
                    column,
                    format!("unexpected character {}", quote(&other.to_string())),
                ));
            }
        })
    }

    fn check_name_length(&self, name: &str, line: u32, column: u32) -> Result<(), SyntaxError> {
        if name.len() > NAME_BYTES_MAX {
            return Err(self.error(
                line,
                column,
                format!(
                    "name of {} bytes is longer than the maximum of {NAME_BYTES_MAX} bytes",
                    name.len()
                ),
            ));
        }
        Ok(())
    }
}

fn is_word_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '#'
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '@' | '$' | '#')
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => unreachable!("only ASCII hex digits are collected"),
    }
}

/// `'text'`, cut to a readable length, for messages.
pub(crate) fn quote(text: &str) -> String {
    format!("'{}'", truncate(text))
}

/// `text`, cut to a readable length (with `…`), for messages.
pub(crate) fn truncate(text: &str) -> String {
    const QUOTE_CHARS_MAX: usize = 40;
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS_MAX).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every token through `Eof`, or the first invalid one's error.
    fn tokenize(text: &str) -> Result<Vec<Token>, SyntaxError> {
        let mut lexer = Lexer::new(text);
        let mut tokens = Vec::new();
        loop {
            let token = lexer.next_token();
            match token.kind {
                TokenKind::Invalid(message) => {
                    return Err(SyntaxError {
                        line: token.line,
                        column: token.column,
                        message,
                    });
                }
                TokenKind::Eof => {
                    tokens.push(token);
                    return Ok(tokens);
                }
                _ => tokens.push(token),
            }
        }
    }

    fn kinds(text: &str) -> Vec<TokenKind> {
        tokenize(text)
            .expect("lexes")
            .into_iter()
            .map(|t| t.kind)
            .collect()
    }

    fn error(text: &str) -> (u32, u32, String) {
        let e = tokenize(text).expect_err("must fail");
        (e.line, e.column, e.message)
    }

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        let tokens = tokenize("SELECT\n  [é]  @x\r\n\t'a'").expect("lexes");
        let at: Vec<(u32, u32)> = tokens.iter().map(|t| (t.line, t.column)).collect();
        assert_eq!(at, vec![(1, 1), (2, 3), (2, 8), (3, 2), (3, 5)]);
        assert_eq!(tokens.last().map(|t| &t.kind), Some(&TokenKind::Eof));
    }

    #[test]
    fn strings_unescape_doubled_quotes_and_mark_national() {
        assert_eq!(
            kinds("'it''s' N'ü' n''''"),
            vec![
                TokenKind::Str {
                    value: "it's".into(),
                    national: false
                },
                TokenKind::Str {
                    value: "ü".into(),
                    national: true
                },
                TokenKind::Str {
                    value: "'".into(),
                    national: true
                },
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn identifiers_unescape_their_closing_character() {
        assert_eq!(
            kinds("[a]]b] \"c\"\"d\" @@ROWCOUNT @x$1"),
            vec![
                TokenKind::Quoted("a]b".into()),
                TokenKind::Quoted("c\"d".into()),
                TokenKind::Variable("@ROWCOUNT".into()),
                TokenKind::Variable("x$1".into()),
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn binary_literals_pad_an_odd_digit_count_like_tsql() {
        assert_eq!(
            kinds("0x 0xABC 0x00ff"),
            vec![
                TokenKind::Binary(vec![]),
                TokenKind::Binary(vec![0x0a, 0xbc]),
                TokenKind::Binary(vec![0x00, 0xff]),
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn comments_nest_and_vanish() {
        assert_eq!(
            kinds("-- one\n/* two /* three */ still */ 42 -- four"),
            vec![TokenKind::Int(42), TokenKind::Eof]
        );
    }

    #[test]
    fn go_is_a_separator_only_alone_on_its_line() {
        assert_eq!(
            kinds("go\n  GO -- done\nx GO\nGO 2"),
            vec![
                TokenKind::Go,
                TokenKind::Go,
                TokenKind::Word,
                TokenKind::Word,
                TokenKind::Word,
                TokenKind::Int(2),
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn unterminated_things_are_reported_where_they_open() {
        assert_eq!(error("x\n  'abc").0, 2);
        assert_eq!(error("x\n  'abc").1, 3);
        assert!(error("'abc").2.contains("unterminated string"));
        assert_eq!(error("/* /* */"), (1, 1, "unterminated /* comment".into()));
        assert_eq!(error("  [abc"), (1, 3, "unterminated [] identifier".into()));
        assert_eq!(error("[]"), (1, 1, "empty [] identifier".into()));
        assert_eq!(error("a @ b").1, 3);
    }

    #[test]
    fn bad_numbers_and_characters_are_errors() {
        assert!(error("1.5").2.contains("decimal"));
        assert_eq!(error("12ab").2, "invalid number '12ab'");
        assert_eq!(error("0x1g").2, "invalid binary literal '0x1g'");
        assert!(error("99999999999999999999").2.contains("out of range"));
        assert_eq!(error("a + b"), (1, 3, "unexpected character '+'".into()));
        assert_eq!(
            kinds("<> != 18446744073709551615"),
            vec![
                TokenKind::Symbol(Symbol::NotEq),
                TokenKind::Symbol(Symbol::NotEq),
                TokenKind::Int(u64::MAX),
                TokenKind::Eof
            ]
        );
    }
}
