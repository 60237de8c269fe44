"""Adversarial pages for the educational-value classifier, written for this project (no third-party text):
keyword lists, word salad, stuffing by repetition, and spam around one pasted educational paragraph.

Used by tests/test_classifier_guards.py and benchmarks/bench_edu_guards.py. Everything is deterministic
(seeded), so a page is the same on every run.
"""

from __future__ import annotations

import random

TERMS = (
    "photosynthesis mitochondria algebra theorem derivative integral vector matrix eigenvalue hypothesis "
    "experiment molecule electron proton neutron ecosystem evolution chromosome enzyme equation function variable "
    "geometry triangle hypotenuse fraction decimal probability statistics variance regression syntax recursion "
    "algorithm loop compiler grammar vocabulary sentence paragraph essay history revolution democracy constitution "
    "economics inflation supply demand geography continent latitude climate volcano erosion sediment fossil "
    "gravity momentum velocity acceleration friction energy kinetic potential thermodynamics entropy circuit "
    "voltage resistance current lesson tutorial exercise homework textbook chapter curriculum syllabus lecture "
    "student teacher learning"
).split()

# Genuine teaching prose, one paragraph per line (controls; and the source of the shuffled salad).
LESSONS = [
    "Photosynthesis is the process by which green plants turn light into chemical energy. In the leaves, "
    "chlorophyll absorbs light, and the plant uses that energy to join carbon dioxide from the air with water "
    "drawn up from the soil. The products are glucose, which the plant stores or burns for growth, and oxygen, "
    "which it releases through small pores called stomata.",
    "You can see the effect at home. Put a pond plant under a lamp and count the bubbles it gives off each "
    "minute; then move the lamp further away and count again. The count falls, because less light reaches the "
    "leaves. Plot the number of bubbles against the distance and you have measured how the rate of a reaction "
    "depends on one of its inputs.",
    "A fraction names a part of a whole. In three quarters, the bottom number says the whole was cut into four "
    "equal parts and the top number says we take three of them. To add two fractions with different bottoms, "
    "first rewrite both over a common bottom: one half is two quarters, so one half plus one quarter is three "
    "quarters.",
    "Why does a ball thrown upwards come back down? Gravity pulls it towards the ground the whole time, so its "
    "upward speed shrinks by about ten metres per second every second. At the top of its path the speed is "
    "zero for an instant, and from then on the same pull makes it fall faster and faster until it lands.",
    "When you write a loop in a program, ask two questions before you run it. What changes each time round, "
    "and when does it stop? A loop that adds the numbers from one to ten keeps a running total and a counter; "
    "the counter goes up by one each time, and the loop ends when the counter passes ten.",
    "Rivers shape the land they cross. Fast water on a steep slope carries sand and stones and cuts a narrow "
    "valley; where the slope eases, the water slows down and drops what it carried, building wide flat plains. "
    "Over thousands of years a single river can move enough rock to fill a city.",
]

# Spam and page chrome: promotional lines of the kind that fill doorway and SEO pages.
SPAM = [
    "Looking for the cheapest flights to anywhere? Book today and get an extra 20% off with our promo code!",
    "Our casino welcomes new players with 200 free spins and a matched deposit bonus up to $1,000.",
    "Get your custom essay written by a professional writer in as little as three hours, guaranteed.",
    "Hurry, this limited offer ends at midnight, so add the item to your cart before stock runs out.",
    "Thousands of happy customers trust our replica watches, which look exactly like the originals.",
    "Sign up for our newsletter and be the first to hear about flash sales, coupons and giveaways.",
    "Need cash fast? Payday loans are approved within minutes, even with bad credit, no questions asked.",
    "Call our hotline now and a friendly agent will help you choose the perfect insurance plan.",
    "Free shipping on all orders over $49, plus easy returns within thirty days of delivery.",
    "Click the button below to download the full version of the software without registration.",
    "Meet attractive singles near you tonight: create your free profile in under a minute.",
    "Our weight loss tea melts fat while you sleep, and doctors hate how well it works.",
    "Rated five stars by our customers, this vacuum cleaner is on sale for a fraction of the usual price.",
    "Earn money from home by filling in simple surveys; many members make hundreds of dollars a week.",
    "Visit our online pharmacy for discount medicines delivered discreetly to your door.",
    "Best prices on used cars in your area, with financing available for every credit score.",
    "Stream thousands of movies and live sports in HD with a single subscription, cancel anytime.",
    "Join the VIP club to unlock members-only deals, birthday rewards and early access to new collections.",
    "Boost your followers and likes instantly with our safe social media growth packages.",
    "This week only, buy two pairs of sneakers and get the third pair completely free.",
    "Trusted locksmiths available around the clock, arriving at your home within thirty minutes.",
    "Refinance your mortgage today and lower your monthly payments with our no-fee calculator.",
    "Our SEO experts will put your website on the first page of search results, or your money back.",
    "Shop the new summer collection of dresses, sandals and sunglasses before it sells out.",
    "Win a brand new smartphone: just enter your email address and share this page with five friends.",
    "Tags: cheap essay, buy essay online, essay writer, homework help, best writing service",
    "Related posts: Top 10 casinos of the year | How to get rich quick | Best crypto coins to buy now",
    "Copyright 2024 All rights reserved. Privacy policy. Terms of use. Contact us. Advertise with us.",
]

FUNCTION_FILL = "the of and to in a is that for it as with was on be by this are from at or an which".split()


def keyword_pages(seed: int = 0) -> dict[str, str]:
    """Pages a bag-of-words model mistakes for teaching: lists of academic terms, in several layouts."""
    rng = random.Random(seed)
    terms = rng.sample(TERMS, len(TERMS))
    return {
        "keyword_list_lines": "\n".join(terms),
        "keyword_list_commas": ", ".join(terms),
        "keyword_stuffed": " ".join(rng.choice(TERMS) for _ in range(400)),
        "keyword_list_with_articles": ", ".join(f"{rng.choice(['the', 'a'])} {t}" for t in terms + terms[:40]),
        "keyword_title_list": "\n".join(f"Lesson {i + 1}: {t.title()} and {rng.choice(TERMS).title()}"
                                        for i, t in enumerate(terms)),
    }


def salad_pages(seed: int = 0) -> dict[str, str]:
    """Word salad: real teaching words in an order no writer would use."""
    rng = random.Random(seed)
    words = " ".join(LESSONS).split()
    rng.shuffle(words)
    shuffled = " ".join(words)
    # sentence-like chunks of shuffled words, each capitalised and ended with a full stop
    chunks, i = [], 0
    while i < len(words):
        k = rng.randint(8, 20)
        piece = " ".join(w.strip(".,;?") for w in words[i:i + k])
        chunks.append(piece[:1].upper() + piece[1:] + ".")
        i += k
    mixed = " ".join(rng.choice(TERMS) if rng.random() < 0.6 else rng.choice(FUNCTION_FILL) for _ in range(400))
    return {"word_salad_shuffled": shuffled, "word_salad_sentences": " ".join(chunks), "word_salad_mixed": mixed}


def repetition_pages() -> dict[str, str]:
    """Stuffing by repetition: one teaching sentence or paragraph over and over."""
    sentence = LESSONS[0].split(". ")[0] + "."
    return {"repeated_sentence": " ".join([sentence] * 40), "repeated_paragraph": "\n".join([LESSONS[2]] * 8)}


def spam_page(paragraph: str, spam_share: float = 0.6, seed: int = 0, position: str = "middle") -> str:
    """A page that is mostly spam (`spam_share` of its characters, roughly) with `paragraph` pasted in it."""
    rng = random.Random(seed)
    lines = rng.sample(SPAM, len(SPAM))
    k = 0
    need = len(paragraph) * spam_share / (1 - spam_share)
    while k < len(lines) and sum(len(x) + 1 for x in lines[:k]) < need:
        k += 1
    lines = lines[:k]
    at = {"first": 0, "middle": len(lines) // 2, "last": len(lines)}[position]
    return "\n".join(lines[:at] + [paragraph] + lines[at:])


def adversarial_pages(seed: int = 0) -> dict[str, str]:
    """Every adversarial page that needs no model-specific text (pasted-spam pages with the model's own training
    text are built from its training_hashes.npz, see tests/test_classifier_guards.py)."""
    pages = {**keyword_pages(seed), **salad_pages(seed), **repetition_pages()}
    for i, lesson in enumerate(LESSONS[:3]):
        pages[f"pasted_spam_lesson{i}"] = spam_page(lesson, 0.6, seed + i)
    return pages


def control_pages() -> dict[str, str]:
    """Genuine teaching pages (one paragraph per line) that no gate may stop."""
    return {"lessons_all": "\n".join(LESSONS), "lessons_science": "\n".join(LESSONS[:2] + LESSONS[3:4] + LESSONS[5:]),
            "lessons_maths_code": "\n".join([LESSONS[2], LESSONS[4]])}
