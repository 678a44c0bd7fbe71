"""Facts the project writes itself: countries with their capital, official language, currency and
continent; well-known cities with their country; landmarks with their country and city.

Written from general knowledge for :mod:`attnx.evaluate.facts` (the factual-recall league of language
models): each fact is a subject (a country, a city or a landmark), a relation and the accepted
answers; each relation has a few prompt templates whose next word is the answer. Where a fact has several common answers
(Bolivia: ``Sucre`` and ``La Paz``), they are separated by
``/``; a prompt counts as answered when the model's greedy continuation starts with one of them.
The subject never starts a prompt, so that it is never the first token (which language models use
as an attention sink).

>>> prompts = fact_prompts()
>>> prompts[0].text, prompts[0].answers
('The capital of Afghanistan is', ('Kabul',))
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CITIES", "COLUMNS", "FactPrompt", "LANDMARKS", "RELATIONS", "TABLE", "TABLES", "fact_prompts", "facts"]

#: the relations and their templates (``{subject}`` is replaced by the country, city or landmark)
RELATIONS: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {subject} is", "The capital city of {subject} is",
                "The capital of {subject} is the city of"),
    "language": ("The official language of {subject} is", "In {subject}, most people speak"),
    "currency": ("The currency of {subject} is the", "In {subject}, people pay with the"),
    "continent": ("The country of {subject} is located in", "The country {subject} is part of the continent of"),
    "city_country": ("The city of {subject} is located in the country of", "The city of {subject} is in"),
    "landmark_country": ("The {subject} can be found in the country of", "You can visit the {subject} in"),
    "landmark_city": ("The {subject} can be found in the city of",),
}
#: the columns of :data:`TABLE` after the subject
COLUMNS = ("capital", "language", "currency", "continent")

#: ``country|capital|language|currency|continent``; ``a/b``: either answer is right
TABLE = """
Afghanistan|Kabul|Pashto/Dari|afghani|Asia
Albania|Tirana|Albanian|lek|Europe
Algeria|Algiers|Arabic|dinar|Africa
Andorra|Andorra la Vella|Catalan|euro|Europe
Angola|Luanda|Portuguese|kwanza|Africa
Argentina|Buenos Aires|Spanish|peso|South America
Armenia|Yerevan|Armenian|dram|Asia
Australia|Canberra|English|dollar/Australian dollar|Oceania/Australia
Austria|Vienna|German|euro|Europe
Azerbaijan|Baku|Azerbaijani|manat|Asia
Bahrain|Manama|Arabic|dinar|Asia
Bangladesh|Dhaka|Bengali/Bangla|taka|Asia
Belarus|Minsk|Belarusian/Russian|ruble/rouble|Europe
Belgium|Brussels|Dutch/French|euro|Europe
Belize|Belmopan|English|dollar|North America
Benin|Porto-Novo|French|franc|Africa
Bhutan|Thimphu|Dzongkha|ngultrum|Asia
Bolivia|Sucre/La Paz|Spanish|boliviano|South America
Bosnia and Herzegovina|Sarajevo|Bosnian|mark/convertible mark|Europe
Botswana|Gaborone|English/Setswana|pula|Africa
Brazil|Brasília/Brasilia|Portuguese|real|South America
Brunei|Bandar Seri Begawan|Malay|dollar|Asia
Bulgaria|Sofia|Bulgarian|lev|Europe
Burkina Faso|Ouagadougou|French|franc|Africa
Burundi|Gitega/Bujumbura|Kirundi/French|franc|Africa
Cambodia|Phnom Penh|Khmer|riel|Asia
Cameroon|Yaoundé/Yaounde|French/English|franc|Africa
Canada|Ottawa|English/French|dollar/Canadian dollar|North America
Chad|N'Djamena|French/Arabic|franc|Africa
Chile|Santiago|Spanish|peso|South America
China|Beijing|Chinese/Mandarin|yuan/renminbi|Asia
Colombia|Bogotá/Bogota|Spanish|peso|South America
Costa Rica|San José/San Jose|Spanish|colón/colon|North America
Croatia|Zagreb|Croatian|euro/kuna|Europe
Cuba|Havana|Spanish|peso|North America
Cyprus|Nicosia|Greek|euro|Europe/Asia
Czech Republic|Prague|Czech|koruna/crown|Europe
Denmark|Copenhagen|Danish|krone/Danish krone|Europe
Djibouti|Djibouti|French/Arabic|franc|Africa
Dominican Republic|Santo Domingo|Spanish|peso|North America
Ecuador|Quito|Spanish|dollar/US dollar|South America
Egypt|Cairo|Arabic|pound/Egyptian pound|Africa
El Salvador|San Salvador|Spanish|dollar/US dollar|North America
Eritrea|Asmara|Tigrinya|nakfa|Africa
Estonia|Tallinn|Estonian|euro|Europe
Ethiopia|Addis Ababa|Amharic|birr|Africa
Fiji|Suva|English/Fijian|dollar|Oceania
Finland|Helsinki|Finnish|euro|Europe
France|Paris|French|euro|Europe
Gabon|Libreville|French|franc|Africa
Georgia|Tbilisi|Georgian|lari|Asia/Europe
Germany|Berlin|German|euro|Europe
Ghana|Accra|English|cedi|Africa
Greece|Athens|Greek|euro|Europe
Guatemala|Guatemala City|Spanish|quetzal|North America
Guinea|Conakry|French|franc|Africa
Guyana|Georgetown|English|dollar|South America
Haiti|Port-au-Prince|French/Haitian Creole|gourde|North America
Honduras|Tegucigalpa|Spanish|lempira|North America
Hungary|Budapest|Hungarian|forint|Europe
Iceland|Reykjavik/Reykjavík|Icelandic|króna/krona|Europe
India|New Delhi|Hindi/English|rupee/Indian rupee|Asia
Indonesia|Jakarta|Indonesian|rupiah|Asia
Iran|Tehran|Persian/Farsi|rial|Asia
Iraq|Baghdad|Arabic|dinar|Asia
Ireland|Dublin|Irish/English|euro|Europe
Israel|Jerusalem|Hebrew|shekel/new shekel|Asia
Italy|Rome|Italian|euro|Europe
Jamaica|Kingston|English|dollar/Jamaican dollar|North America
Japan|Tokyo|Japanese|yen|Asia
Jordan|Amman|Arabic|dinar|Asia
Kazakhstan|Astana|Kazakh|tenge|Asia
Kenya|Nairobi|Swahili/English|shilling|Africa
Kuwait|Kuwait City|Arabic|dinar|Asia
Kyrgyzstan|Bishkek|Kyrgyz|som|Asia
Laos|Vientiane|Lao|kip|Asia
Latvia|Riga|Latvian|euro|Europe
Lebanon|Beirut|Arabic|pound|Asia
Lesotho|Maseru|Sesotho/English|loti|Africa
Liberia|Monrovia|English|dollar|Africa
Libya|Tripoli|Arabic|dinar|Africa
Liechtenstein|Vaduz|German|franc/Swiss franc|Europe
Lithuania|Vilnius|Lithuanian|euro|Europe
Luxembourg|Luxembourg|Luxembourgish/French|euro|Europe
Madagascar|Antananarivo|Malagasy|ariary|Africa
Malawi|Lilongwe|English/Chichewa|kwacha|Africa
Malaysia|Kuala Lumpur|Malay|ringgit|Asia
Maldives|Malé/Male|Dhivehi|rufiyaa|Asia
Mali|Bamako|French/Bambara|franc|Africa
Malta|Valletta|Maltese|euro|Europe
Mauritania|Nouakchott|Arabic|ouguiya|Africa
Mauritius|Port Louis|English|rupee|Africa
Mexico|Mexico City|Spanish|peso|North America
Moldova|Chișinău/Chisinau|Romanian|leu|Europe
Monaco|Monaco|French|euro|Europe
Mongolia|Ulaanbaatar/Ulan Bator|Mongolian|tögrög/tugrik|Asia
Montenegro|Podgorica|Montenegrin|euro|Europe
Morocco|Rabat|Arabic|dirham|Africa
Mozambique|Maputo|Portuguese|metical|Africa
Myanmar|Naypyidaw/Naypyitaw|Burmese|kyat|Asia
Namibia|Windhoek|English|dollar|Africa
Nepal|Kathmandu|Nepali|rupee|Asia
Netherlands|Amsterdam|Dutch|euro|Europe
New Zealand|Wellington|English/Maori|dollar/New Zealand dollar|Oceania
Nicaragua|Managua|Spanish|córdoba/cordoba|North America
Niger|Niamey|French|franc|Africa
Nigeria|Abuja|English|naira|Africa
North Korea|Pyongyang|Korean|won|Asia
North Macedonia|Skopje|Macedonian|denar|Europe
Norway|Oslo|Norwegian|krone|Europe
Oman|Muscat|Arabic|rial|Asia
Pakistan|Islamabad|Urdu/English|rupee|Asia
Panama|Panama City|Spanish|balboa|North America
Papua New Guinea|Port Moresby|English/Tok Pisin|kina|Oceania
Paraguay|Asunción/Asuncion|Spanish/Guarani|guaraní/guarani|South America
Peru|Lima|Spanish|sol|South America
Philippines|Manila|Filipino/English|peso|Asia
Poland|Warsaw|Polish|złoty/zloty|Europe
Portugal|Lisbon|Portuguese|euro|Europe
Qatar|Doha|Arabic|riyal|Asia
Romania|Bucharest|Romanian|leu|Europe
Russia|Moscow|Russian|ruble/rouble|Europe/Asia
Rwanda|Kigali|Kinyarwanda/English/French|franc|Africa
Saudi Arabia|Riyadh|Arabic|riyal|Asia
Senegal|Dakar|French|franc|Africa
Serbia|Belgrade|Serbian|dinar|Europe
Sierra Leone|Freetown|English|leone|Africa
Singapore|Singapore|English/Malay|dollar|Asia
Slovakia|Bratislava|Slovak|euro|Europe
Slovenia|Ljubljana|Slovene/Slovenian|euro|Europe
Somalia|Mogadishu|Somali|shilling|Africa
South Africa|Pretoria|English/Afrikaans/Zulu|rand|Africa
South Korea|Seoul|Korean|won|Asia
South Sudan|Juba|English|pound|Africa
Spain|Madrid|Spanish|euro|Europe
Sri Lanka|Colombo/Sri Jayawardenepura Kotte|Sinhala/Tamil|rupee|Asia
Sudan|Khartoum|Arabic|pound|Africa
Suriname|Paramaribo|Dutch|dollar|South America
Sweden|Stockholm|Swedish|krona|Europe
Switzerland|Bern|German/French|franc/Swiss franc|Europe
Syria|Damascus|Arabic|pound|Asia
Taiwan|Taipei|Mandarin/Chinese|dollar/new Taiwan dollar|Asia
Tajikistan|Dushanbe|Tajik|somoni|Asia
Tanzania|Dodoma|Swahili|shilling|Africa
Thailand|Bangkok|Thai|baht|Asia
Togo|Lomé/Lome|French|franc|Africa
Tunisia|Tunis|Arabic|dinar|Africa
Turkey|Ankara|Turkish|lira|Asia/Europe
Turkmenistan|Ashgabat|Turkmen|manat|Asia
Uganda|Kampala|English/Swahili|shilling|Africa
Ukraine|Kyiv/Kiev|Ukrainian|hryvnia|Europe
United Arab Emirates|Abu Dhabi|Arabic|dirham|Asia
United Kingdom|London|English|pound/pound sterling|Europe
United States|Washington|English|dollar/US dollar|North America
Uruguay|Montevideo|Spanish|peso|South America
Uzbekistan|Tashkent|Uzbek|som|Asia
Venezuela|Caracas|Spanish|bolívar/bolivar|South America
Vietnam|Hanoi|Vietnamese|dong|Asia
Yemen|Sanaa/Sana'a|Arabic|rial|Asia
Zambia|Lusaka|English|kwacha|Africa
Zimbabwe|Harare|English/Shona|dollar|Africa
"""

#: ``city|country`` (well-known cities other than capitals; names shared with a place elsewhere left out)
CITIES = """Lyon|France
Marseille|France
Nice|France
Toulouse|France
Bordeaux|France
Munich|Germany
Hamburg|Germany
Frankfurt|Germany
Cologne|Germany
Stuttgart|Germany
Milan|Italy
Naples|Italy
Florence|Italy
Venice|Italy
Turin|Italy
Barcelona|Spain
Seville|Spain
Bilbao|Spain
Porto|Portugal
Manchester|England/the United Kingdom/United Kingdom/the UK/UK/Britain/Great Britain
Liverpool|England/the United Kingdom/United Kingdom/the UK/UK/Britain/Great Britain
Glasgow|Scotland/the United Kingdom/United Kingdom/the UK/UK/Britain/Great Britain
Edinburgh|Scotland/the United Kingdom/United Kingdom/the UK/UK/Britain/Great Britain
Rotterdam|the Netherlands/Netherlands/Holland
Antwerp|Belgium
Geneva|Switzerland
Zurich|Switzerland
Salzburg|Austria
Krakow|Poland
Gdansk|Poland
Novosibirsk|Russia
Istanbul|Turkey/Türkiye
Izmir|Turkey/Türkiye
Osaka|Japan
Kyoto|Japan
Yokohama|Japan
Hiroshima|Japan
Shanghai|China
Guangzhou|China
Shenzhen|China
Busan|South Korea/Korea
Mumbai|India
Kolkata|India
Bangalore|India
Chennai|India
Karachi|Pakistan
Lahore|Pakistan
Dubai|the United Arab Emirates/United Arab Emirates/the UAE/UAE
Jeddah|Saudi Arabia
Casablanca|Morocco
Marrakesh|Morocco
Lagos|Nigeria
Johannesburg|South Africa
Cape Town|South Africa
Durban|South Africa
Mombasa|Kenya
Toronto|Canada
Montreal|Canada
Vancouver|Canada
Sydney|Australia
Melbourne|Australia
Brisbane|Australia
Auckland|New Zealand
Chicago|the United States/United States/the USA/USA/the US/America
Los Angeles|the United States/United States/the USA/USA/the US/America
Houston|the United States/United States/the USA/USA/the US/America
San Francisco|the United States/United States/the USA/USA/the US/America
Boston|the United States/United States/the USA/USA/the US/America
Seattle|the United States/United States/the USA/USA/the US/America
Miami|the United States/United States/the USA/USA/the US/America
Rio de Janeiro|Brazil
São Paulo|Brazil
Monterrey|Mexico
Cancún|Mexico
Medellín|Colombia
Valparaíso|Chile
Cusco|Peru
Ho Chi Minh City|Vietnam
Chiang Mai|Thailand
Phuket|Thailand
Surabaya|Indonesia
Cebu|the Philippines/Philippines
Tel Aviv|Israel
Haifa|Israel
Aleppo|Syria
Basra|Iraq
Isfahan|Iran
Kharkiv|Ukraine
Gothenburg|Sweden
Bergen|Norway
Aarhus|Denmark
Thessaloniki|Greece
Dubrovnik|Croatia
Plovdiv|Bulgaria
Brno|the Czech Republic/Czech Republic/Czechia
Debrecen|Hungary
"""

#: ``landmark|country|city`` (as named after "the"); an empty cell: no city asked
LANDMARKS = """Eiffel Tower|France|Paris
Arc de Triomphe|France|Paris
Louvre|France|Paris
Colosseum|Italy|Rome
Trevi Fountain|Italy|Rome
Leaning Tower of Pisa|Italy|Pisa
Uffizi Gallery|Italy|Florence
Statue of Liberty|the United States/United States/the USA/USA/the US/America|New York
Empire State Building|the United States/United States/the USA/USA/the US/America|New York
Golden Gate Bridge|the United States/United States/the USA/USA/the US/America|San Francisco
Space Needle|the United States/United States/the USA/USA/the US/America|Seattle
White House|the United States/United States/the USA/USA/the US/America|Washington
Hollywood Sign|the United States/United States/the USA/USA/the US/America|Los Angeles/Hollywood
Grand Canyon|the United States/United States/the USA/USA/the US/America|
Taj Mahal|India|Agra
Gateway of India|India|Mumbai/Bombay
Great Wall|China|
Forbidden City|China|Beijing
Tiananmen Square|China|Beijing
Terracotta Army|China|Xi'an/Xian
Oriental Pearl Tower|China|Shanghai
Sydney Opera House|Australia|Sydney
Sydney Harbour Bridge|Australia|Sydney
Big Ben|England/the United Kingdom/United Kingdom/the UK/UK/Britain/Great Britain|London
Buckingham Palace|England/the United Kingdom/United Kingdom/the UK/UK/Britain/Great Britain|London
Tower Bridge|England/the United Kingdom/United Kingdom/the UK/UK/Britain/Great Britain|London
Brandenburg Gate|Germany|Berlin
Reichstag building|Germany|Berlin
Neuschwanstein Castle|Germany|
Acropolis|Greece|Athens
Parthenon|Greece|Athens
Kremlin|Russia|Moscow
Red Square|Russia|Moscow
Hermitage Museum|Russia|Saint Petersburg/St. Petersburg/St Petersburg
Sagrada Familia|Spain|Barcelona
Alhambra|Spain|Granada
Prado Museum|Spain|Madrid
Rijksmuseum|the Netherlands/Netherlands/Holland|Amsterdam
Charles Bridge|the Czech Republic/Czech Republic/Czechia|Prague
Atomium|Belgium|Brussels
Little Mermaid statue|Denmark|Copenhagen
Petronas Towers|Malaysia|Kuala Lumpur
Burj Khalifa|the United Arab Emirates/United Arab Emirates/the UAE/UAE|Dubai
Pyramids of Giza|Egypt|Giza/Cairo
Hagia Sophia|Turkey/Türkiye|Istanbul
CN Tower|Canada|Toronto
Table Mountain|South Africa|Cape Town
Marina Bay Sands|Singapore|Singapore
Shwedagon Pagoda|Myanmar/Burma|Yangon/Rangoon
"""

#: each table: its text, and the relation of each column after the subject
TABLES = ((TABLE, COLUMNS), (CITIES, ("city_country",)), (LANDMARKS, ("landmark_country", "landmark_city")))


@dataclass(frozen=True)
class FactPrompt:
    """One prompt: ``text`` whose next word is one of ``answers``; ``subject`` starts at character
    ``subject_start`` of ``text``."""

    text: str
    subject: str
    relation: str
    template: int
    answers: tuple[str, ...]
    subject_start: int

    @property
    def subject_end(self) -> int:
        return self.subject_start + len(self.subject)


def facts() -> list[tuple[str, dict[str, tuple[str, ...]]]]:
    """``(subject, {relation: answers})`` for every row of :data:`TABLES`, in table order (an empty
    cell: the relation is not asked of that subject)."""
    out = []
    for text, columns in TABLES:
        for line in text.strip().splitlines():
            subject, *cells = line.split("|")
            out.append((subject, {r: tuple(a.strip() for a in c.split("/")) for r, c in zip(columns, cells) if c.strip()}))
    return out


def fact_prompts(relations: dict[str, tuple[str, ...]] | None = None) -> list[FactPrompt]:
    """Every (subject, relation, template) prompt, subject-major: the prompts of a subject are adjacent.

    Parameters
    ----------
    relations:
        Templates per relation (default :data:`RELATIONS`); each contains ``{subject}`` once.
    """
    relations = RELATIONS if relations is None else relations
    out = []
    for subject, answers in facts():
        for relation, templates in relations.items():
            if relation not in answers:
                continue
            for i, template in enumerate(templates):
                before = template.split("{subject}")[0]
                out.append(FactPrompt(template.format(subject=subject), subject, relation, i,
                                      answers[relation], len(before)))
    return out
