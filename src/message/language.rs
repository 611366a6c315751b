//! A small language guess from function words, for the retraining gate's
//! per-language slices (a correction keeps no text to ask later). Mail in
//! a language it does not know, or too short to tell, is `und`.

/// Frequent short words that rarely occur in the other languages listed.
const STOPWORDS: &[(&str, &[&str])] = &[
    (
        "en",
        &["the", "and", "is", "are", "you", "we", "with", "for", "this", "that", "have", "please", "not", "our", "be"],
    ),
    (
        "de",
        &["der", "die", "das", "und", "ist", "nicht", "ich", "wir", "sie", "mit", "für", "ein", "eine", "bitte", "auf"],
    ),
    (
        "fr",
        &["le", "la", "les", "et", "est", "une", "nous", "vous", "pour", "avec", "pas", "dans", "sur", "je", "merci"],
    ),
    (
        "es",
        &["el", "los", "las", "y", "es", "una", "para", "con", "por", "que", "nuestro", "su", "gracias", "del", "está"],
    ),
    ("pt", &["o", "os", "e", "é", "uma", "para", "com", "não", "que", "nosso", "obrigado", "do", "da", "em", "está"]),
    (
        "it",
        &["il", "gli", "e", "è", "una", "per", "con", "non", "che", "grazie", "della", "nel", "sono", "di", "questo"],
    ),
    (
        "nl",
        &["de", "het", "en", "is", "een", "niet", "wij", "voor", "met", "bedankt", "van", "op", "ons", "dat", "zijn"],
    ),
];

/// ISO 639-1 code of the likeliest language, or `und`.
pub fn detect(text: &str) -> &'static str {
    let mut hits = [0usize; STOPWORDS.len()];
    let mut seen = 0;
    for w in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).take(400) {
        let w = w.to_lowercase();
        seen += 1;
        for (i, (_, words)) in STOPWORDS.iter().enumerate() {
            if words.contains(&w.as_str()) {
                hits[i] += 1;
            }
        }
    }
    let (best, &n) = hits.iter().enumerate().max_by_key(|&(i, n)| (*n, usize::MAX - i)).expect("languages listed");
    let second = hits.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, n)| *n).max().unwrap_or(0);
    // At least two function words, and a clear winner.
    if seen == 0 || n < 2 || n == second {
        "und"
    } else {
        STOPWORDS[best].0
    }
}

/// The code a stored guess names, as [`detect`] returns it (`und` for any other).
pub fn code(stored: &str) -> &'static str {
    STOPWORDS.iter().map(|(c, _)| *c).find(|c| *c == stored).unwrap_or("und")
}

#[cfg(test)]
mod tests {
    use super::detect;

    #[test]
    fn tells_the_ticket_languages_apart() {
        assert_eq!(detect("Hello, we are unable to log in and the app is not loading. Please help."), "en");
        assert_eq!(detect("Hallo, wir können uns nicht anmelden und die App lädt nicht. Bitte helfen Sie."), "de");
        assert_eq!(detect("Bonjour, nous ne pouvons pas nous connecter et la page est vide. Merci"), "fr");
        assert_eq!(detect("Hola, no podemos acceder a la cuenta y el pago está pendiente, gracias por su ayuda"), "es");
        assert_eq!(detect("Invoice 7"), "und");
        assert_eq!(detect(""), "und");
    }
}
