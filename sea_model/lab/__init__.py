"""``sea lab``: does SEA work? A synthetic world with renderer ground truth (:mod:`.world`), a tiny CLIP
trained on it (:mod:`.clip`) and the SEA-vs-baseline experiment (:mod:`.experiment`)."""
