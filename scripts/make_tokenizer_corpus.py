"""Write the tokenizer test corpus (deterministic: hand-written snippets + a fixed seed).

Outputs
  tests/data/tokenizer_corpus.txt             one sample per line (no "\\n" or "\\r" inside)
  tests/data/tokenizer_corpus_multiline.jsonl one JSON string per line, samples with newlines

Run:  python scripts/make_tokenizer_corpus.py
Then: /work/refvenv/bin/python scripts/make_tokenizer_golden.py   (llama.cpp reference ids)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SEED = 20250314
N_LINES = 2200
N_MULTILINE = 120

# Hand-written sentences, grouped by language / script.
SENTENCES = {
    "en": [
        "The quick brown fox jumps over the lazy dog.",
        "It's a truth universally acknowledged that tokenizers are harder than they look.",
        "Don't panic: we'll re-run the tests at 9:30 a.m. tomorrow (UTC).",
        "She said, \"I can't believe it's already November!\"",
        "Mr. O'Neil bought 3 apples, 12 oranges & a half-dozen eggs.",
        "HTTPS://Example.COM/path?query=value&other=42#fragment",
        "e-mail me at first.last+filter@example.org, or call +1 (555) 010-9999.",
        "ALL CAPS SENTENCES SHOULD STILL TOKENIZE CORRECTLY, SHOULDN'T THEY?",
        "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
        "Well... that was unexpected -- wasn't it?!",
        "Gemma 3 comes in 270M, 1B, 4B, 12B and 27B parameter sizes.",
        "café naïve résumé coöperate façade jalapeño",
    ],
    "fr": [
        "Le cœur a ses raisons que la raison ne connaît point.",
        "Où est la bibliothèque ? Elle est à côté de l'église.",
        "« Ça alors ! » s'écria-t-il, tout ébahi.",
        "Les élèves étudient l'histoire de l'Europe au XIXᵉ siècle.",
        "Il faut qu'on se dépêche, le train part à 18 h 45.",
        "L'œuvre complète d'Émile Zola compte vingt romans.",
    ],
    "de": [
        "Größere Äpfel schmecken nicht unbedingt süßer als kleine.",
        "Die Donaudampfschifffahrtsgesellschaftskapitänsmütze ist verschwunden.",
        "Übung macht den Meister, sagt man in Österreich.",
        "Straße, Maß und Fuß werden mit ß geschrieben.",
        "Können Sie mir bitte sagen, wie spät es ist?",
        "Der Weiße Hai schwimmt außerhalb der Bucht.",
    ],
    "vi": [
        "Tiếng Việt có sáu thanh điệu và rất nhiều dấu phụ.",
        "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
        "Tôi muốn uống một ly cà phê sữa đá.",
        "Người ta thường nói: “Có công mài sắt, có ngày nên kim.”",
        "Phở bò và bánh mì là những món ăn nổi tiếng.",
        "Chúng tôi sẽ gặp nhau ở Thành phố Hồ Chí Minh vào thứ Bảy.",
    ],
    "pl": [
        "Zażółć gęślą jaźń.",
        "Chrząszcz brzmi w trzcinie w Szczebrzeszynie.",
        "Pójdźże, kiń tę chmurność w głąb flaszy!",
        "Wrocław, Łódź i Gdańsk to duże polskie miasta.",
        "Dziękuję bardzo za pomoc przy przeprowadzce.",
    ],
    "es": [
        "¿Dónde está la estación de trenes? ¡Necesito llegar pronto!",
        "El niño comió una manzana y después durmió la siesta.",
        "Año tras año, la cigüeña vuelve al campanario.",
    ],
    "tr": [
        "Pijamalı hasta yağız şoföre çabucak güvendi.",
        "İstanbul'da ılık bir sonbahar akşamı geçirdik.",
    ],
    "cs": [
        "Příliš žluťoučký kůň úpěl ďábelské ódy.",
        "Řeřicha roste na okně v kuchyni.",
    ],
    "ru": [
        "Съешь же ещё этих мягких французских булок, да выпей чаю.",
        "Москва — столица Российской Федерации.",
        "В чащах юга жил бы цитрус? Да, но фальшивый экземпляр!",
        "Привет, как дела? Всё хорошо, спасибо.",
        "Широкая электрификация южных губерний даст мощный толчок подъёму сельского хозяйства.",
    ],
    "uk": [
        "Чуєш їх, доцю, га? Кумедна ж ти, прощайся без ґольфів!",
        "Київ розташований на берегах Дніпра.",
    ],
    "bg_sr": [
        "Жълтата дюля беше щастлива, че пухът, който цъфна, замръзна като гьон.",
        "Љубазни фењерџија чађавог лица хоће да ми покаже штос.",
    ],
    "el": [
        "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
        "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
        "Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο.",
        "Καλημέρα! Τι κάνεις σήμερα;",
        "Το π ισούται περίπου με 3,14159 και το φ με 1,618.",
    ],
    "ar": [
        "مرحبا بالعالم، كيف حالك اليوم؟",
        "اللغة العربية من أكثر اللغات انتشارا في العالم.",
        "نَصٌّ عَرَبِيٌّ مُشَكَّلٌ بِالحَرَكَاتِ الكَامِلَةِ.",
        "الأرقام العربية: ٠ ١ ٢ ٣ ٤ ٥ ٦ ٧ ٨ ٩ والسنة ٢٠٢٥.",
        "القاهرة هي عاصمة جمهورية مصر العربية.",
    ],
    "fa": [
        "زبان فارسی با الفبای عربی نوشته می‌شود.",
        "امروز هوا خیلی خوب است؛ بیا به پارک برویم.",
    ],
    "he": [
        "שלום עולם! מה שלומך היום?",
        "ירושלים היא עיר עתיקה מאוד.",
        "עִבְרִית עִם נִקּוּד מָלֵא.",
        "הספר עולה 45 ₪ בחנות שליד התחנה.",
        "Mixing RTL and LTR: שלום hello עולם world.",
    ],
    "hi": [
        "नमस्ते दुनिया! आप कैसे हैं?",
        "भारत एक विशाल और विविधतापूर्ण देश है।",
        "हिन्दी देवनागरी लिपि में लिखी जाती है।",
        "मैं कल सुबह दिल्ली जाऊँगा।",
        "संख्याएँ: १ २ ३ ४ ५ ६ ७ ८ ९ ०",
    ],
    "mr_ne": [
        "मराठी भाषा महाराष्ट्रात बोलली जाते.",
        "नेपाल हिमालयको काखमा अवस्थित छ।",
    ],
    "bn": [
        "আমি বাংলায় গান গাই।",
        "ঢাকা বাংলাদেশের রাজধানী।",
        "রবীন্দ্রনাথ ঠাকুর নোবেল পুরস্কার পেয়েছিলেন।",
        "সংখ্যা: ১ ২ ৩ ৪ ৫",
    ],
    "ta": [
        "வணக்கம் உலகம்!",
        "தமிழ் ஒரு தொன்மையான மொழி.",
        "சென்னை தமிழ்நாட்டின் தலைநகரம் ஆகும்.",
        "யாதும் ஊரே யாவரும் கேளிர்.",
    ],
    "te_kn_ml": [
        "తెలుగు భాష చాలా మధురమైనది.",
        "ಕನ್ನಡ ಒಂದು ದ್ರಾವಿಡ ಭಾಷೆ.",
        "മലയാളം കേരളത്തിലെ ഭാഷയാണ്.",
    ],
    "gu_pa": [
        "ગુજરાતી ભાષા ગુજરાતમાં બોલાય છે.",
        "ਪੰਜਾਬੀ ਗੁਰਮੁਖੀ ਲਿਪੀ ਵਿੱਚ ਲਿਖੀ ਜਾਂਦੀ ਹੈ।",
    ],
    "th": [
        "สวัสดีครับ ยินดีต้อนรับ",
        "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
        "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
        "ฉันชอบกินข้าวผัดกุ้งมาก",
    ],
    "lo_km_my": [
        "ສະບາຍດີ ພາສາລາວ",
        "ភាសាខ្មែរ គឺជាភាសាផ្លូវការរបស់កម្ពុជា",
        "မြန်မာဘာသာစကား",
    ],
    "zh": [
        "你好，世界！今天天气很好。",
        "中华人民共和国的首都是北京。",
        "我喜欢学习机器学习和自然语言处理。",
        "繁體中文與簡體中文並不完全相同。",
        "「知之為知之，不知為不知，是知也。」",
        "他花了１２３元买了三本书。",
    ],
    "ja": [
        "こんにちは、世界！",
        "日本語にはひらがな、カタカナ、漢字があります。",
        "東京スカイツリーは高さ634メートルです。",
        "ｶﾀｶﾅの半角文字も混ざっています。",
        "吾輩は猫である。名前はまだ無い。",
        "コンピューターでプログラミングを勉強しています。",
    ],
    "ko": [
        "안녕하세요, 세계!",
        "한국어는 한글로 씁니다.",
        "서울은 대한민국의 수도입니다.",
        "다람쥐 헌 쳇바퀴에 타고파.",
        "오늘 점심은 김치찌개와 비빔밥이었어요.",
    ],
    "ka": [
        "გამარჯობა, მსოფლიო!",
        "საქართველოს დედაქალაქი თბილისია.",
        "ქართული ანბანი ძალიან ლამაზია.",
    ],
    "hy": [
        "Բարև, աշխարհ։",
        "Երևանը Հայաստանի մայրաքաղաքն է։",
        "Հայոց այբուբենը ստեղծել է Մեսրոպ Մաշտոցը։",
    ],
    "am": [
        "ሰላም ለዓለም!",
        "አዲስ አበባ የኢትዮጵያ ዋና ከተማ ናት።",
        "አማርኛ በግዕዝ ፊደል ይጻፋል።",
    ],
    "other_scripts": [
        "བོད་ཡིག་ནི་ཡི་གེ་ཞིག་ཡིན།",
        "ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ",
        "ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ",
        "ᚠᚢᚦᚨᚱᚲ ᚷᚹᚺᚾᛁᛃ",
        "𐌀𐌁𐌂 𐌃𐌄𐌅 Old Italic",
        "𝔗𝔥𝔢 𝔮𝔲𝔦𝔠𝔨 𝒷𝓇ℴ𝓌𝓃 𝕗𝕠𝕩 𝟙𝟚𝟛",
        "⠓⠑⠇⠇⠕ ⠺⠕⠗⠇⠙",
        "ꦲꦏ꧀ꦱꦫꦗꦮ Javanese script",
        "ܫܠܡܐ ܥܠܡܐ Syriac",
        "ދިވެހި Thaana",
        "සිංහල භාෂාව",
    ],
}

CODE = [
    "def greet(name: str) -> str:",
    "    return f\"Hello, {name}!\"",
    "for i in range(10): print(i ** 2, end=', ')",
    "class Node:  # a tree node",
    "    def __init__(self, value, children=None):",
    "        self.children = children or []",
    "import numpy as np; x = np.zeros((3, 4), dtype=np.float32)",
    "lambda x, y: (x + y) * 2 if x > 0 else -y",
    "assert tokens == [2, 9259, 1902], f'{tokens!r}'",
    "#include <stdio.h>",
    "int main(int argc, char **argv) { printf(\"%d\\n\", argc); return 0; }",
    "static inline uint32_t rotl(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }",
    "for (size_t i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "#define MAX(a, b) ((a) > (b) ? (a) : (b))",
    "struct llm_symbol { int prev; int next; const char *text; size_t n; };",
    "{\"name\": \"gemma\", \"layers\": 18, \"rope_theta\": 1000000.0, \"tied\": true}",
    "[{\"id\": 1, \"tags\": [\"a\", \"b\"]}, {\"id\": 2, \"tags\": []}, null]",
    "{\"escaped\": \"line\\nbreak \\t tab \\u00e9\", \"nested\": {\"k\": [1, 2.5e-3]}}",
    "<!DOCTYPE html><html><head><title>Test page</title></head>",
    "<div class=\"container\"><p>Hello <b>bold</b> and <i>italic</i></p></div>",
    "<table><tr><td>1</td><td>2</td></tr></table>",
    "<a href=\"https://example.com\">link</a> <img src=\"x.png\" alt=\"\">",
    "<ul><li>one</li><li>two</li></ul> <h1>Title</h1> <code>x = 1</code>",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC LIMIT 10;",
    "fn main() { let v: Vec<i32> = (1..=5).map(|x| x * x).collect(); println!(\"{:?}\", v); }",
    "git commit -m \"fix: handle empty input\" && git push origin main",
    "curl -sSL https://example.com/install.sh | bash -s -- --prefix=/usr/local",
    "const add = (a, b) => a + b; console.log(`sum=${add(2, 3)}`);",
    "x := map[string]int{\"a\": 1}; if v, ok := x[\"a\"]; ok { fmt.Println(v) }",
    "$ ls -la /tmp | grep -E '^d' | wc -l",
    "a[i][j] += b[i][k] * c[k][j];  // matmul inner loop",
    "regex = r'^(?P<user>[\\w.+-]+)@(?P<host>[\\w-]+\\.[\\w.]+)$'",
]

SPECIAL_TEXT = [
    "<start_of_turn>user", "<end_of_turn>", "<start_of_turn>model", "<bos>", "<eos>",
    "<pad>", "<unk>", "<mask>", "[multimodal]", "<start_of_image>", "<end_of_image>",
    "<unused0>", "<unused42>", "<unused98>", "<unused99>", "<unused6241>", "<unused6242>",
    "<0x41>", "<0xE2><0x96><0x81>", "<0x0A>", "<0xFF>", "<s>", "</s>", "<table>",
    "</td>", "<blockquote>", "<start_of_turn", "end_of_turn>", "<<bos>>", "<bos><bos>",
    "<start_of_<bos>turn>", "<eos >", "< bos>", "<BOS>", "<start_of_turn><end_of_turn>",
    "<unused12><unused1>", "<0x41><0x42>", "[multimodal][multimodal]",
]

EMOJI = [
    "👍", "👍🏽", "👍🏿", "❤️", "🇫🇷", "🇯🇵", "🏳️‍🌈", "👨‍👩‍👧‍👦", "👩🏾‍💻", "🧑🏻‍🚀",
    "1️⃣", "#️⃣", "😀😃😄😁", "🤷‍♀️", "🫠", "🦀🐍", "✈️", "☕", "🇺🇳", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
]

COMBINING = [
    "e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323", "Z\u0334\u0321\u032aa\u0337l\u0336g\u0335o\u0338",
    "A\u030a", "\u1100\u1161\u11a8", "क\u094d\u200dष", "i\u0307\u0301", "c\u0327",
    "Vie\u0302\u0323t Nam", "\u0915\u093f", "x\u20d7", "q\u0338\u0335",
]

NUMBERS = [
    "3.14159265358979", "1,234,567.89", "0x1F", "0b101010", "12345678901234567890",
    "2025-03-14T15:09:26Z", "-0.000001", "1e-9", "+49 30 1234567", "１２３４５",
    "٠١٢٣٤٥٦٧٨٩", "१२३", "৪২", "Ⅻ", "½ ¾ ⅞", "42%", "$19.99", "€5,00", "¥1000", "№7",
    "9999999", "007", "3/4", "1:2:3", "v2.13.0",
]

SYMBOLS = [
    "→ ← ↑ ↓ ⇒ ∀ ∃ ∈ ∉ ∑ ∏ √ ∞ ≈ ≠ ≤ ≥", "© ® ™ § ¶ † ‡ • … ‰", "«»„“”‘’‹›",
    "¡¿", "@#$%^&*()_+-=[]{}|;':\",./<>?`~", "\\\\ // \\ /", "□■▲△▼▽◆◇○●",
    "ﬁ ﬂ ﬀ", "\u00a0non-breaking\u00a0space", "zero\u200bwidth\u200bspace", "soft\u00adhyphen",
    "bidi \u202eoverride\u202c end", "\u2581literal lower block\u2581", "▁▁▁", "\ufeffBOM",
    "tab\u3000ideographic\u3000space",
]

# Control and line-separator characters: only in the JSONL samples, so the .txt corpus
# stays a plain text file that any line splitter reads the same way.
CONTROL_CHARS = [
    "\u2028line sep", "\u2029para sep", "\u0000nul", "\x1bescape", "\x7fdel", "\x0bvt",
    "\x0cff", "\x85nel", "\x1cfs\x1dgs\x1ers", "\x01\x02\x03",
]

WHITESPACE = [
    " ", "  ", "   ", "\t", "\t\t", " \t", "\t ", " \t \t ", " " * 30, " " * 31, " " * 32,
    " " * 33, " " * 45, " " * 62, " " * 63, " " * 64, " " * 100, "\t" * 31, "\t" * 35,
    " \t" * 20, "  \t\t  ", "\u00a0\u00a0", "\u3000",
]

SEPARATORS = [" ", " ", " ", "", "  ", "\t", " — ", ", ", "; ", " | ", "...", " - "]


def all_fragments() -> list[str]:
    fragments = [s for group in SENTENCES.values() for s in group]
    return fragments + CODE + SPECIAL_TEXT + EMOJI + COMBINING + NUMBERS + SYMBOLS


def single_lines(rng: random.Random) -> list[str]:
    """Every fragment alone, then pseudo-random mixtures up to N_LINES."""
    fragments = all_fragments()
    lines = list(fragments)
    lines += [w + "x" + w for w in WHITESPACE] + [w for w in WHITESPACE]
    lines += [" " + s for s in fragments[:40]] + [s + "  " for s in fragments[40:80]]
    pools = [fragments, SPECIAL_TEXT, EMOJI, COMBINING, NUMBERS, SYMBOLS, WHITESPACE, CODE]
    weights = [10, 2, 2, 1, 2, 1, 2, 2]
    while len(lines) < N_LINES:
        parts = []
        for _ in range(rng.randint(2, 5)):
            pool = rng.choices(pools, weights)[0]
            parts.append(rng.choice(pool))
            parts.append(rng.choice(SEPARATORS))
        line = "".join(parts[:-1])
        if rng.random() < 0.1:
            line = rng.choice(WHITESPACE) + line
        if rng.random() < 0.1:
            line += rng.choice(WHITESPACE)
        lines.append(line)
    assert all("\n" not in line and "\r" not in line for line in lines)
    return lines


def multiline_samples(rng: random.Random) -> list[str]:
    """Samples with newlines (runs up to beyond the 31-newline user-defined token)."""
    breaks = ["\n", "\n", "\n\n", "\n\n\n", "\r\n", " \n", "\n ", "\n\t", "\n" * 31,
              "\n" * 35, "\n" * 70, " \n \n", "\n\n\n\n\n\n\n\n", "\x0b", "\x0c", "\r"]
    samples = ["", "\n", "\n\n", " \n ", "\n" * 32, "a\nb", "\r\n\r\n"] + CONTROL_CHARS
    samples.append("\n".join(CODE[:9]))
    samples.append("\n".join(CODE[9:15]))
    samples.append("<start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n")
    samples.append("<bos><start_of_turn>user\nYou are terse.\n\nSummarise: 北京<end_of_turn>\n<start_of_turn>model\n")
    fragments = all_fragments() + CONTROL_CHARS
    while len(samples) < N_MULTILINE:
        parts = []
        for _ in range(rng.randint(2, 6)):
            parts.append(rng.choice(fragments))
            parts.append(rng.choice(breaks))
        samples.append("".join(parts[:-1] if rng.random() < 0.7 else parts))
    return samples


def main() -> None:
    rng = random.Random(SEED)
    lines = single_lines(rng)
    samples = multiline_samples(rng)
    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA / "tokenizer_corpus.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))
    with open(DATA / "tokenizer_corpus_multiline.jsonl", "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    print(f"{len(lines)} lines, {len(samples)} multi-line samples -> {DATA}")


if __name__ == "__main__":
    main()
