"""The English vocabulary astrea gives a *random-weight* RAM++ (tests, demo), written for astrea.

Real weights never use it: the released checkpoint's 4585 tags come from the official tag list file,
which the user provides (see ``ram_plus.py``). A random model has no meaning to match, but its tags
still flow into Grounding-DINO prompts and stage targets, so they should be real words: shapes and
colours first (the sample dataset draws coloured shapes), then a few hundred everyday objects, scenes
and attributes. ``vocabulary(n)`` pads with ``tag_0000``-style names past the hand-written list.
"""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "rectangle", "star", "ellipse", "hexagon", "diamond", "cross", "ring")
COLOURS = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "cyan",
    "magenta",
)
OBJECTS = (
    # people and animals
    "person", "man", "woman", "child", "baby", "crowd", "face", "hand", "dog", "cat", "horse", "cow", "sheep",
    "bird", "duck", "chicken", "fish", "elephant", "bear", "zebra", "giraffe", "lion", "tiger", "monkey",
    "rabbit", "mouse", "squirrel", "deer", "goat", "pig", "butterfly", "bee", "insect", "snake", "turtle",
    "frog", "penguin", "owl", "eagle", "parrot",
    # vehicles and street
    "car", "truck", "bus", "train", "bicycle", "motorcycle", "airplane", "boat", "ship", "taxi", "van",
    "tractor", "scooter", "helicopter", "traffic light", "stop sign", "street sign", "fire hydrant",
    "parking meter", "road", "street", "sidewalk", "crosswalk", "bridge", "tunnel", "highway", "railway",
    "station", "parking lot", "gas station",
    # furniture and home
    "chair", "table", "couch", "bed", "desk", "shelf", "bookshelf", "cabinet", "drawer", "door", "window",
    "curtain", "carpet", "rug", "pillow", "blanket", "lamp", "mirror", "clock", "vase", "plant",
    "potted plant", "flower", "picture frame", "painting", "wall", "floor", "ceiling", "stairs", "fireplace",
    "bathtub", "shower", "toilet", "sink", "towel", "kitchen", "bedroom", "living room", "bathroom",
    "dining room", "office", "balcony", "garage", "garden", "fence",
    # kitchen and food
    "refrigerator", "oven", "microwave", "stove", "toaster", "kettle", "pot", "pan", "plate", "bowl", "cup",
    "mug", "glass", "bottle", "wine glass", "fork", "knife", "spoon", "chopsticks", "cutting board",
    "food", "bread", "cake", "pizza", "sandwich", "hot dog", "donut", "cookie", "cheese", "egg", "meat",
    "salad", "soup", "rice", "noodles", "fruit", "apple", "banana", "orange fruit", "grape", "strawberry",
    "lemon", "watermelon", "vegetable", "carrot", "broccoli", "tomato", "potato", "onion", "corn", "coffee",
    "tea", "juice", "milk", "wine", "beer", "water",
    # electronics and tools
    "computer", "laptop", "keyboard", "computer mouse", "monitor", "screen", "television", "phone",
    "cell phone", "remote control", "camera", "headphones", "speaker", "microphone", "tablet", "printer",
    "cable", "battery", "light bulb", "fan", "hammer", "screwdriver", "wrench", "saw", "scissors", "ladder",
    "bucket", "broom", "box", "bag", "basket", "suitcase", "backpack", "handbag", "umbrella", "wallet", "key",
    "book", "notebook", "paper", "pen", "pencil", "envelope", "letter", "map", "newspaper", "magazine",
    "poster", "sign", "logo", "text", "flag", "balloon", "candle", "gift", "toy", "teddy bear", "doll",
    "ball", "kite",
    # clothing
    "shirt", "t-shirt", "jacket", "coat", "dress", "skirt", "pants", "jeans", "shorts", "suit", "tie", "hat",
    "cap", "helmet", "glasses", "sunglasses", "shoe", "boot", "sneaker", "sock", "glove", "scarf", "watch",
    "necklace", "ring jewelry", "earring", "uniform",
    # sport
    "sports ball", "football", "basketball", "tennis racket", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "skis", "snowboard", "frisbee", "goal", "net", "stadium", "field", "court", "swimming pool",
    "gym", "player", "team",
    # scenes and nature
    "sky", "cloud", "sun", "moon", "star sky", "rain", "snow", "fog", "sunset", "sunrise", "night", "tree",
    "forest", "grass", "leaf", "bush", "mountain", "hill", "rock", "stone", "sand", "beach", "sea", "ocean",
    "lake", "river", "waterfall", "island", "desert", "valley", "cliff", "cave", "ice", "fire", "smoke",
    "city", "town", "village", "building", "house", "skyscraper", "tower", "church", "castle", "temple",
    "market", "shop", "restaurant", "cafe", "hotel", "school", "hospital", "airport", "harbor", "farm",
    "park", "playground", "museum", "library", "street light", "bench", "statue", "fountain",
    # attributes and actions
    "indoor", "outdoor", "dark", "bright", "colorful", "wooden", "metal", "plastic", "glass material",
    "striped", "dotted", "old", "new", "small", "large", "empty", "crowded", "wet", "dry", "sit", "stand",
    "walk", "run", "ride", "play", "eat", "drink", "sleep", "read", "write", "smile", "hold", "fly", "swim",
    "drive", "jump", "cook", "talk", "lay",
    # media
    "photo", "drawing", "cartoon", "illustration", "diagram", "chart", "screenshot", "pattern", "texture",
    "background", "close-up", "shadow", "reflection", "line", "dot", "shape", "color",
)

HAND_WRITTEN: tuple[str, ...] = SHAPES + COLOURS + OBJECTS


def vocabulary(n: int) -> list[str]:
    """``n`` distinct English tags: the hand-written list, then ``tag_NNNN`` placeholders."""
    if n < 1:
        raise ValueError(f"vocabulary size must be >= 1, got {n}")
    words = list(dict.fromkeys(HAND_WRITTEN))[:n]
    width = max(4, len(str(n - 1)))
    words += [f"tag_{i:0{width}d}" for i in range(len(words), n)]
    return words
