"""Build the demo dataset (taxonomy.json, train.jsonl, test.jsonl) from the hand-written messages_*.txt.

Each message in messages_*.txt was written for one label (14 a label, 50 labels). This script only
dresses them as real email: greetings, sign-offs and signatures, some quoted reply history, some
forwards, some HTML, a few typos. The dressing is what the normaliser must strip, so training and
serving see the same text. Deterministic (fixed seed); run `python -m training.demo.build` after
editing a messages file and commit the outputs.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_PER_LABEL = 10  # the other 4 of each label are the held-out test set
SEED = 7

GREETINGS = ["", "Hi,", "Hello,", "Hi team,", "Dear Support,", "Hello there,", "Good morning,", "Hey,", "Dear Sir or Madam,", "Hi all,"]
OPENERS = ["", "", "", "Hope you're well.", "I hope this is the right address.", "Sorry to bother you again.",
           "I'm writing on behalf of our office.", "Quick one:", "Following up on my call earlier today."]
NAMES = ["Ana Souza", "Tom", "Priya Nair", "J. Müller", "Kwame Mensah", "Li Wei", "Sarah O'Connor", "Marco", "Fatima Al-Sayed",
         "Hannah Berg", "Diego Fernández", "Olga", "Chris Taylor", "Yuki Tanaka", "Ben"]
SIGNOFFS = ["Thanks,", "Thank you,", "Best regards,", "Kind regards,", "Cheers,", "Regards,", "Many thanks,", "Best,", "Thanks in advance,"]
TITLES = ["Office Manager", "Head of Finance", "IT Administrator", "Operations Lead", "Founder", "HR Coordinator", "Procurement"]
COMPANIES = ["Acme GmbH", "Northwind Ltd", "Blue Harbor Inc.", "Studio Kappa", "Greenfield School", "Orbit Logistics"]
QUOTED = [
    "Thank you for contacting us. Could you share more details so we can look into this?",
    "We have received your request and a member of our team will get back to you shortly.",
    "Your ticket #{n} has been updated. Please reply to this email if you need anything else.",
    "Thanks for your patience. Is there anything else we can help you with?",
]


def typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(words))
        w = words[i]
        if len(w) > 4:
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def dress(subject: str, body: str, rng: random.Random, n: int) -> tuple:
    if rng.random() < 0.15:
        body = typo(body, rng)
    name = rng.choice(NAMES)
    lines = [g for g in [rng.choice(GREETINGS)] if g]
    opener = rng.choice(OPENERS)
    lines += ["", f"{opener} {body}".strip() if opener else body]
    r = rng.random()
    if r < 0.45:
        lines += ["", rng.choice(SIGNOFFS), name]
    elif r < 0.65:
        lines += ["", rng.choice(SIGNOFFS), name, "--", f"{name} | {rng.choice(TITLES)}", rng.choice(COMPANIES), f"+44 20 7946 0{rng.randint(100, 999)}"]
    elif r < 0.75:
        lines += ["", "Sent from my iPhone"]
    elif r < 0.85:
        lines += [f"{rng.choice(['Thanks', 'Cheers', 'Regards'])}, {name.split()[0]}"]
    text = "\n".join(lines).strip()
    r = rng.random()
    if r < 0.2:  # a reply on top of support's earlier message
        subject = "Re: " + subject
        quote = rng.choice(QUOTED).format(n=40000 + n)
        text += f"\n\nOn Tue, {rng.randint(1, 28)} Oct 2026 at {rng.randint(8, 18)}:{rng.randint(10, 59)}, Support <support@example.com> wrote:\n> {quote}\n>\n> Support Team"
    elif r < 0.3:  # a colleague forwards a customer's email
        subject = "Fwd: " + subject
        text = (f"FYI, see below.\n\n---------- Forwarded message ---------\nFrom: {name} <{name.split()[0].lower()}@customer.example>\n"
                f"Date: Mon, {rng.randint(1, 28)} Sep 2026 09:{rng.randint(10, 59)}\nSubject: {subject[5:]}\nTo: info@example.com\n\n{text}")
    if rng.random() < 0.1:  # HTML mail client
        paras = "".join(f"<p>{p}</p>" for p in text.split("\n") if p.strip())
        text = f"<html><head><style>p {{margin:0}}</style></head><body>{paras}</body></html>"
    return subject, text


def read_messages():
    labels, messages = [], {}
    for path in sorted(HERE.glob("messages_*.txt")):
        label = None
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("##"):
                name, desc, group = [x.strip() for x in line[2:].split("|")]
                labels.append({"name": name, "description": desc, "group": group})
                label = name
                messages[label] = []
            elif line.strip():
                subject, body = line.split(" :: ", 1)
                messages[label].append((subject.strip(), body.strip()))
    return labels, messages


def main():
    labels, messages = read_messages()
    rng = random.Random(SEED)
    train, test, n = [], [], 0
    for label in labels:
        rows = messages[label["name"]][:]
        rng.shuffle(rows)
        for i, (subject, body) in enumerate(rows):
            n += 1
            subject, text = dress(subject, body, rng, n)
            row = {"id": f"demo-{n:04d}", "subject": subject, "body": text, "label": label["name"]}
            (train if i < TRAIN_PER_LABEL else test).append(row)
    (HERE / "taxonomy.json").write_text(json.dumps({"name": "demo-email", "labels": labels}, indent=1, ensure_ascii=False) + "\n")
    for name, rows in (("train", train), ("test", test)):
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(labels)} labels, {len(train)} train, {len(test)} test")


if __name__ == "__main__":
    main()
