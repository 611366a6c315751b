//! HTML → plain text for classification, tolerant of the broken markup real
//! mail is full of (unclosed `<head>`, stray `<`, missing quotes).
//!
//! Not a renderer: it drops tags, skips `<script>`/`<style>` content and
//! comments, turns block elements into line breaks and decodes entities. Text
//! is never lost because a closing tag is missing: only `script` and `style`
//! swallow content, and only up to their end tag or the end of the input.

/// Converts HTML to text.
pub fn to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        push_decoded(&mut out, &rest[..lt]);
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |i| &after[i + 3..]);
            continue;
        }
        // A '<' not followed by a tag name (e.g. "a < b") is text.
        let tag_start = rest[1..].chars().next();
        if !tag_start.is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '!' || c == '?') {
            out.push('<');
            rest = &rest[1..];
            continue;
        }
        let end = tag_end(rest);
        // An unterminated tag runs to the end of the text, which may end in a
        // multi-byte character: only a closing '>' is cut (found by fuzzing).
        let tag = rest[1..end].strip_suffix('>').unwrap_or(&rest[1..end]);
        rest = &rest[end..];
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        let closing = tag.starts_with('/');
        if !closing && (name == "script" || name == "style") {
            let close = format!("</{name}");
            rest = find_ci(rest, &close).map_or("", |i| {
                let r = &rest[i..];
                &r[tag_end(r)..]
            });
            continue;
        }
        if name == "img" {
            // What a reader sees when images are off; image-only spam has nothing else.
            if let Some(alt) = attribute(tag, "alt") {
                out.push(' ');
                push_decoded(&mut out, &alt);
                out.push(' ');
            }
        } else if is_block(&name) {
            out.push('\n');
        } else if name == "td" || name == "th" {
            out.push(' ');
        }
    }
    push_decoded(&mut out, rest);
    tidy(&out)
}

/// Index just past the `>` that closes the tag at the start of `s`, honouring
/// quoted attribute values; the end of input if there is none.
fn tag_end(s: &str) -> usize {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices().skip(1) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '>') => return i + 1,
            _ => {}
        }
        // An unbalanced quote must not swallow the document.
        if i > 4096 {
            return s[i..].find('>').map_or(s.len(), |j| i + j + 1);
        }
    }
    s.len()
}

/// The value of attribute `name` in a tag's text, quoted or not.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let mut search = tag;
    loop {
        let i = find_ci(search, name)?;
        let before = search[..i].chars().next_back();
        let after = search[i + name.len()..].trim_start();
        search = &search[i + name.len()..];
        if !before.is_some_and(char::is_whitespace) {
            continue;
        }
        let Some(value) = after.strip_prefix('=').map(str::trim_start) else { continue };
        return Some(match value.chars().next() {
            Some(q @ ('"' | '\'')) => value[1..].split(q).next().unwrap_or("").to_string(),
            _ => value.split(|c: char| c.is_whitespace() || c == '>').next().unwrap_or("").to_string(),
        });
    }
}

fn find_ci(haystack: &str, needle: &str) -> Option<usize> {
    let n = needle.len();
    haystack
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| haystack.get(i..i + n).is_some_and(|w| w.eq_ignore_ascii_case(needle)))
}

fn is_block(name: &str) -> bool {
    matches!(
        name,
        "br" | "p"
            | "div"
            | "tr"
            | "li"
            | "ul"
            | "ol"
            | "table"
            | "h1"
            | "h2"
            | "h3"
            | "h4"
            | "h5"
            | "h6"
            | "blockquote"
            | "pre"
            | "hr"
            | "title"
            | "body"
            | "center"
            | "dd"
            | "dt"
            | "section"
            | "article"
            | "header"
            | "footer"
    )
}

/// Appends text with character references decoded.
fn push_decoded(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let semi = rest[1..].find(';').map(|i| i + 1).filter(|&i| i <= 10);
        let decoded = semi.and_then(|i| entity(&rest[1..i]).map(|c| (c, i + 1)));
        match decoded {
            Some((c, used)) => {
                out.push(c);
                rest = &rest[used..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
}

fn entity(name: &str) -> Option<char> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse().ok()?,
        };
        return char::from_u32(code).filter(|c| !c.is_control() || c.is_whitespace());
    }
    Some(match name {
        "nbsp" | "ensp" | "emsp" | "thinsp" => ' ',
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "euro" => '€',
        "pound" => '£',
        "yen" => '¥',
        "cent" => '¢',
        "sect" => '§',
        "deg" => '°',
        "middot" | "bull" => '•',
        "hellip" => '…',
        "ndash" => '–',
        "mdash" => '—',
        "lsquo" | "rsquo" => '\'',
        "ldquo" | "rdquo" => '"',
        "laquo" => '«',
        "raquo" => '»',
        "auml" => 'ä',
        "ouml" => 'ö',
        "uuml" => 'ü',
        "Auml" => 'Ä',
        "Ouml" => 'Ö',
        "Uuml" => 'Ü',
        "szlig" => 'ß',
        "eacute" => 'é',
        "egrave" => 'è',
        "ecirc" => 'ê',
        "aacute" => 'á',
        "agrave" => 'à',
        "acirc" => 'â',
        "iacute" => 'í',
        "oacute" => 'ó',
        "uacute" => 'ú',
        "ntilde" => 'ñ',
        "ccedil" => 'ç',
        "Eacute" => 'É',
        _ => return None,
    })
}

/// Collapses runs of spaces within lines and drops empty lines.
fn tidy(s: &str) -> String {
    s.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::to_text;

    #[test]
    fn tags_blocks_and_entities() {
        assert_eq!(
            to_text("<p>Your <b>invoice</b>&nbsp;#42</p><p>is &amp; was due&#33; &#x263A;</p>"),
            "Your invoice #42\nis & was due! ☺"
        );
    }

    #[test]
    fn script_style_and_comments_are_skipped() {
        assert_eq!(to_text("<style>p{x:1}</style>a<script>if (a<b) x()</script>b<!-- hidden -->c"), "abc");
        assert_eq!(to_text("a<SCRIPT>never closed"), "a");
    }

    #[test]
    fn an_unterminated_tag_ending_in_a_multibyte_character() {
        assert_eq!(to_text("<s\u{FFFD}"), "");
        assert_eq!(to_text("x<a href=\"é"), "x");
    }

    #[test]
    fn broken_markup_keeps_text() {
        // Unclosed <head>: the body text must survive.
        assert_eq!(to_text("<HTML><HEAD>\n<BODY>Want To Harvest</BODY>"), "Want To Harvest");
        assert_eq!(to_text("a < b and c > d"), "a < b and c > d");
        assert_eq!(to_text("<a href=\"x>y\">link</a> text"), "link text");
        assert_eq!(to_text("<td>1</td><td>2</td>"), "1 2");
        assert_eq!(to_text("x &bogus; &amp"), "x &bogus; &amp");
        assert_eq!(to_text("<div"), "");
        assert_eq!(to_text("<img src=x.gif alt=\"Cheap meds\"><IMG ALT=now src=y>"), "Cheap meds now");
    }
}
