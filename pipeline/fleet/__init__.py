"""The dealers' sites over their lifetime: adding and onboarding them, their states, when
each renews, what dispatch starts, beat's upkeep, alerts, retention, revocation and what the
reports show."""
