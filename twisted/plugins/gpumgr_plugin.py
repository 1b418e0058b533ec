from twisted.application.service import ServiceMaker

gpumgr = ServiceMaker(
    "gpumgr",
    "gpumgr.tap",
    "One door in front of several GPU services: routing, health, GPU lock, eviction.",
    "gpumgr",
)
